"""The one entry point: ``build_loader(shards, student_spec, teacher_spec, **settings)`` -> a Loader.

It checks the settings and specs (one clear error naming the culprit), expands the shard spec, finds
the teacher cache's companions, loads the shard index (shard_index.py: one summary file per folder, a
stat per shard; shards without an up-to-date index are indexed now), and wires stream and loader.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

from ..spec import InputSpec
from .formats import DEFAULT_CAPTION_INSTRUCTION
from .loader import Loader
from .node_cache import NodeCache
from .prepare import Preparer
from .render import check_spec
from .sample_reader import GZIP_COMPANIONS_KEPT, index_plain_companions
from .shard_index import load_indexes
from .shard_io import use_node_cache
from .shards import ShardSpec, expand_shards
from .stream import SampleStream, StreamSettings

log = logging.getLogger(__name__)

# The block shuffle permutes shuffle_buffer consecutive raw samples of the shard-ordered stream, so a block
# (and every global batch cut from it) draws from about shuffle_buffer / (samples per shard) shards: measured
# 1.1 distinct shards per batch of 64 with 1,000-sample shards at shuffle_buffer 1000, 38 at 64,000
# (docs/data_at_scale.md). Below this many shards per block the start-up log says so.
FEW_SHARDS_PER_BLOCK = 8
SHARDS_PER_BLOCK_ADVISED = 64


def _block_span(shuffle_buffer: int, counts: List[int]) -> Tuple[List[int], int, float]:
    """(the shards' nonzero sample counts sorted, their median, about how many such shards a block of
    ``shuffle_buffer`` samples spans); the median is 0 and the span 0.0 when no shard has a sample."""
    counts = sorted(c for c in counts if c)
    typical = counts[len(counts) // 2] if counts else 0
    return counts, typical, shuffle_buffer / typical if typical else 0.0


def _warn_if_blocks_span_few_shards(shuffle_buffer: int, counts: List[int], first_shard: str) -> None:
    """One warning (rank 0, train) when the block shuffle mixes only a few shards' worth of samples."""
    counts, typical, spans = _block_span(shuffle_buffer, counts)
    per_round = sum(counts)
    if len(counts) < 2 or 2 * shuffle_buffer >= per_round:
        return  # one shard, or a block already spans half the data
    if spans >= FEW_SHARDS_PER_BLOCK:
        return
    advised = min(SHARDS_PER_BLOCK_ADVISED * typical, per_round)
    log.warning("shuffle_buffer %d spans about %.1f shard(s) of %s ... (%d samples each, median): every global batch "
                "is drawn from about that many shards; data.shuffle_buffer=%d (%d shards' worth, or the whole set) "
                "mixes them, at ~40 bytes and ~2 us of CPU per sample of a block in each DataLoader worker",
                shuffle_buffer, spans, first_shard, typical, advised, min(SHARDS_PER_BLOCK_ADVISED, len(counts)))


def _warn_if_gzip_companions_thrash(shuffle_buffer: int, counts: List[int], gzip_companions: List[str]) -> None:
    """Gzip companions are read whole and a worker keeps the last few: a block over more shards than that
    re-reads a whole companion for most samples (benchmarks/companion_io.py: 60 kB read and 1.9 ms CPU per
    sample against ~10 kB and 0.5 ms for companions read by range)."""
    counts, _, spans = _block_span(shuffle_buffer, counts)
    spans = min(spans, len(counts))
    if gzip_companions and spans > GZIP_COMPANIONS_KEPT:
        log.warning("the teacher cache's companions are gzip (%s ...): a DataLoader worker reads one whole each time "
                    "its samples move to a shard not among its last %d, and a block of shuffle_buffer %d spans about "
                    "%.0f shards; a cache written with `python -m data_tools.cache_teacher ... --compress records` "
                    "(or `none`) is read by byte range instead", gzip_companions[0], GZIP_COMPANIONS_KEPT,
                    shuffle_buffer, spans)


def _check_specs(student_spec: InputSpec, teacher_spec: Optional[InputSpec], text_only: bool) -> None:
    specs = [("student", student_spec)] + ([("teacher", teacher_spec)] if teacher_spec is not None else [])
    for name, spec in specs:
        check_spec(spec, name)
        if not text_only and not spec.is_multimodal:
            raise ValueError(f"{name} InputSpec is text-only (no image_transform/tokens_per_image) but "
                             "text_only=False; set text_only=True for the LLM path")
    if teacher_spec is not None and teacher_spec.tokenizer is not student_spec.tokenizer:
        vs, vt = student_spec.tokenizer.get_vocab(), teacher_spec.tokenizer.get_vocab()
        if vs != vt:
            raise ValueError(f"teacher and student tokenizers differ ({len(vt)} vs {len(vs)} tokens); "
                             "distillation needs a shared vocabulary")


def build_loader(
    shards: ShardSpec, student_spec: InputSpec, teacher_spec: Optional[InputSpec] = None, *,
    mode: str = "train", batch_size: int = 8, max_length: int = 2048, num_workers: int = 2, seed: int = 0,
    rank: int = 0, world_size: int = 1, caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION,
    text_only: bool = False, pack: bool = False, shuffle_buffer: int = 1000,
    pad_to_multiple_of: Optional[int] = None, pin_memory: bool = False, prefetch_factor: Optional[int] = None,
    multiprocessing_context: Optional[str] = None, companion: Any = None, grad_accum: int = 1,
    shard_cache: Optional[NodeCache] = None, prompt_tokens: int = 0,
) -> Loader:
    """The one entry point: shards + per-model InputSpecs -> a resumable iterable of batches.

    Startup errors (ValueError / FileNotFoundError, naming the culprit): missing shard, empty spec,
    unknown mode, packing without text_only, a text-only spec for image data, an InputSpec whose image
    token or chat template cannot work, teacher/student tokenizers with different vocabularies.

    ``companion``: a teacher cache (taid_vlm.teacher_cache.TeacherCache) instead of ``teacher_spec``:
    batches then carry ``"teacher_topk": {"ids" [K, k], "logprobs" [K, k], "log_tail" [K]}`` aligned
    with ``student.loss_targets`` (and no ``"teacher"`` entry). Every shard's companion is found and
    checked here, at startup.

    ``shard_cache``: the NodeCache (node_cache.py) through which remote shards (``http(s)://``, ``pipe:`` ...)
    and their index files are fetched once per node and read locally (default: node_cache.default_cache_dir).
    ``prompt_tokens``: a raw-text document's prompt is its first that many tokens (render.Renderer).

    Train mode slices ONE global sample order (global_order.py): ``grad_accum`` and ``world_size`` say
    how, so that an optimizer step (``grad_accum`` micro-batches on every rank) sees the same samples
    whatever the world size; ``batch_size`` counts samples (documents, when packed) per micro-batch.
    """
    settings = StreamSettings(mode=mode, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                              seed=seed, rank=rank, world_size=world_size, pack=pack, shuffle_buffer=shuffle_buffer,
                              pad_to_multiple_of=pad_to_multiple_of)
    _check_settings(settings, text_only)
    paths, sources = _expand(shards)
    companion_paths = None
    if companion is not None:
        if teacher_spec is not None:
            raise ValueError("give teacher_spec (online teacher) or companion (cached teacher), not both")
        companion_paths = companion.companions(paths)
    _check_specs(student_spec, teacher_spec, text_only)
    if shard_cache is not None:
        use_node_cache(shard_cache)
    indexes = load_indexes(paths, write=rank == 0)
    companion_indexes = index_plain_companions(companion_paths.values(), rank == 0) if companion_paths else None
    if companion_paths and mode == "train" and rank == 0:
        _warn_if_gzip_companions_thrash(shuffle_buffer, [ix.samples for ix in indexes],
                                        sorted(set(companion_paths.values()) - set(companion_indexes)))
    preparer = Preparer(student_spec, teacher_spec, max_length=max_length, caption_instruction=caption_instruction,
                        text_only=text_only, companion=companion, prompt_tokens=prompt_tokens)
    for k, (first, n, _) in enumerate(sources or [(0, len(paths), 1.0)]):
        counts = [ix.samples for ix in indexes[first:first + n]]
        if sources and not sum(counts):
            raise ValueError(f"data source {k} ({paths[first]} ...) has no readable sample in {n} shard(s)")
        if mode == "train" and rank == 0:
            _warn_if_blocks_span_few_shards(shuffle_buffer, counts, paths[first])
    stream = SampleStream(paths, indexes, preparer, settings, companion_paths, sources, shard_cache, companion_indexes)
    return Loader(stream, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                  multiprocessing_context=multiprocessing_context)


def _expand(shards) -> Tuple[List[str], Optional[List[Tuple[int, int, float]]]]:
    """A shard spec -> (paths, None); a list of sources ``{"shards": spec, "weight": w}`` -> (all their
    paths, (first path, number of paths, weight) per source)."""
    if not (isinstance(shards, (list, tuple)) and shards and all(isinstance(x, dict) for x in shards)):
        return expand_shards(shards), None
    paths: List[str] = []
    sources = []
    for k, src in enumerate(shards):
        unknown = set(src) - {"shards", "weight"}
        if "shards" not in src or unknown:
            raise ValueError(f"data source {k}: needs 'shards' (and optionally 'weight'), got keys {sorted(src)}")
        weight = float(src.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data source {k} ({src['shards']}): weight must be > 0, got {src.get('weight')}")
        mine = expand_shards(src["shards"])
        sources.append((len(paths), len(mine), weight))
        paths += mine
    return paths, sources


def _check_settings(st: StreamSettings, text_only: bool) -> None:
    if st.mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {st.mode!r}")
    if st.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {st.batch_size}")
    if st.grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {st.grad_accum}")
    if not (0 <= st.rank < st.world_size):
        raise ValueError(f"rank {st.rank} outside world_size {st.world_size}")
    if st.pack and not text_only:
        raise ValueError("pack=True is only for text-only data: set text_only=True")
