"""Data: WebDataset shards -> teacher/student batches for distillation.

Entry point (the trainer calls only this)::

    loader = build_loader(shards, student_spec, teacher_spec, mode="train" | "eval", batch_size=8,
                          max_length=2048, num_workers=2, seed=0, rank=0, world_size=1,
                          caption_instruction="Describe the image briefly.", text_only=False, pack=False,
                          shuffle_buffer=1000, pad_to_multiple_of=None, grad_accum=1)
    for batch in loader: ...

``shards``: brace pattern, folder, glob, comma-separated string or list (shards.py), or a weighted
mixture ``[{"shards": spec, "weight": w}, ...]`` (mixture.py). A missing path or an empty spec raises at
build time, naming the path. Shards are read through their index (``<shard>.idx`` + ``shards.index.json``,
shard_index.py; written by data_tools.make_shards / data_tools.index_shards, built at start for local
shards without one): each worker reads only its own samples' bytes. Files by job: docs/data_at_scale.md. ``student_spec``/``teacher_spec`` are
``taid_vlm.spec.InputSpec``s (the only thing this package knows about models); ``teacher_spec=None``
gives batches without a ``"teacher"`` entry (SFT).

Batch contract::

    {
      "student": {
        "input_ids":      LongTensor[B, T]   right-padded with the tokenizer's pad (else eos) id; each
                                             image is tokens_per_image copies of image_token_id
        "attention_mask": LongTensor[B, T]   1 on real tokens
        "labels":         LongTensor[B, T]   token id where supervised (assistant tokens; every token
                                             but the first of a raw text document), -100 elsewhere;
                                             NOT shifted
        "pixel_values":   FloatTensor[M, 3, H, W] | None   all images of the batch, sample-major, in
                                             order of appearance, through this model's transform;
                                             for a dynamic-resolution model (spec.image_processor):
                                             dict of its processor's tensors, concatenated over the
                                             batch (collate.collate_image_inputs)
        "position_ids":   LongTensor[B, T]   only when packed: restart at 0 for every document
        "loss_positions": LongTensor[K]      flat index b*T + i of the hidden state that PREDICTS a
                                             supervised token (the token at i + 1), row-major
        "loss_targets":   LongTensor[K]      the token ids predicted there (= labels.view(-1)[pos + 1])
      },
      "teacher": { same keys, the teacher's own rendering },
      "keys": list[str]                      the samples' __key__s (all documents of a packed batch)
    }

Alignment: ``student.loss_targets[k] == teacher.loss_targets[k]`` for every k (same K), whatever the
two models' image transforms, image-token counts, chat templates or truncation. Supervised tokens
without a partner in the other model's rendering are dropped from both ``labels`` (align.py), so
``labels`` and ``loss_positions`` always agree. Text-only data (``text_only=True``) gives the same
shape with ``pixel_values=None``; ``pack=True`` (text-only) packs documents into rows.

Position and counters: ``loader.state_dict()`` / ``loader.load_state_dict(sd)`` restore the stream
exactly. Train: one global position (global_order.py), the same on every rank, which continues the same
global sample order on ANY world size, worker count or micro-batch layout (from a step boundary); an
optimizer step (``grad_accum`` micro-batches on each of the ``world_size`` ranks) sees the same samples
whatever the world size. Eval: per rank (same seed, world size, worker count, shards, batch size). Only
batches handed to the trainer count as seen. ``loader.check_usable()`` raises NoUsableSampleError when
the shards hold no usable sample (a setup check), as the train stream does after a full pass.
``loader.skips`` is a SkipCounter: ``.as_dict()`` reason -> count, ``.examples`` reason -> keys,
``.summary()`` one log line. Reasons: corrupt_image, missing_image, missing_text, bad_json,
bad_conversation, marker_mismatch, ambiguous_images, images_in_text_only, too_long, unaligned,
truncated_tar, tar_error, fetch_error (skips.py). ``loader.stats``: samples, batches, supervised_tokens, truncated,
unaligned_tokens_dropped. Both are included in the state dict.

Modes: ``train`` is endless (resampled shard rounds, block shuffle of samples); ``eval`` is one exact
pass (each sample once over all ranks and workers; ranks may get different numbers of batches).
"""

from .align import align_labels, loss_positions
from .collate import collate, collate_packed
from .formats import DEFAULT_CAPTION_INSTRUCTION, IMAGE_MARKER
from .factory import build_loader
from .loader import Loader
from .prepare import Prepared, Preparer
from .shard_index import ShardIndex, build_index, load_indexes, write_index
from .shard_io import read_shard
from .stream import SampleStream
from .node_cache import FetchError, NodeCache, default_cache_dir
from .render import IGNORE_INDEX, Rendered, Renderer, check_spec
from .samples import Sample, decode_sample
from .shards import expand_shards
from .skips import NoUsableSampleError, SampleError, SkipCounter

__all__ = [
    "NodeCache", "FetchError", "default_cache_dir",
    "build_loader", "Loader", "NoUsableSampleError", "SampleStream", "read_shard", "expand_shards", "Sample", "decode_sample",
    "Renderer", "Rendered", "check_spec", "align_labels", "loss_positions", "collate", "collate_packed",
    "SampleError", "SkipCounter", "Prepared", "Preparer", "ShardIndex", "build_index", "load_indexes", "write_index", "IMAGE_MARKER", "DEFAULT_CAPTION_INSTRUCTION", "IGNORE_INDEX",
]
