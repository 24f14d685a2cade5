"""Training from a teacher cache: find each data shard's companion, pair records with samples, align
them with the student's supervised tokens, and collate them into ``batch["teacher_topk"]``.

Both cache kinds (manifest ``kind``): a top-k cache collates into ``{"ids", "logprobs", "log_tail",
"tail"}``, a hidden-state cache into ``{"hidden", "lm_head"}`` (the lm_head as a file reference, loaded
once per process where the loss runs); ``source.cached_teacher`` turns either into a TeacherSource.

``TeacherCache`` is the companion object that ``taid_vlm.data.build_loader(..., companion=cache)``
takes. The pipeline zips each data shard's raw samples with its companion's (by position, checking
``__key__``) BEFORE the block shuffle, so shuffling, the rank/worker split and resume carry the cached
teacher along with its sample by construction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from taid_vlm.data.align import matching_tokens
from taid_vlm.data.render import IGNORE_INDEX
from taid_vlm.data.skips import SampleError

from . import format as fmt
from .lm_head import LMHead
from .manifest import CacheMismatchError, read_manifest

# Skip reasons (counted by the data pipeline's SkipCounter).
CACHE_MISSING = "teacher_cache_missing"  # the companion ended before the data shard (truncated companion)
CACHE_CORRUPT = "teacher_cache_corrupt"  # a companion record that does not parse
CACHE_TARGETS = "teacher_cache_unaligned"  # no supervised token of the student matches the cached teacher's


class TeacherCache:
    """A cache folder (manifest + companion shards), picklable for data-loader workers."""

    def __init__(self, folder, manifest: Optional[dict] = None):
        self.folder = str(Path(folder).resolve())
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        self.kind = self.manifest.get("kind", "topk")
        self.vocab_size = int(self.manifest["vocab_size"])
        # a hidden-state cache is the whole distribution: k = V
        self.k = int(self.manifest["k"]) if self.kind == "topk" else self.vocab_size
        self.tail = self.manifest.get("tail", "uniform")
        self.hidden_size = self.manifest.get("hidden_size")
        self.lm_head = LMHead(self.folder, self.manifest["lm_head"]) if self.kind == "hidden" else None
        self._by_source = {os.path.realpath(s["source"]): s for s in self.manifest["shards"]}

    # -- shard mapping ---------------------------------------------------------------------------
    def entry_for(self, shard: str) -> dict:
        """The manifest entry of a data shard: by its real path, else by its name within the cached
        shards (a moved data folder), if that is unique. The data shard's size must be unchanged."""
        real = os.path.realpath(shard)
        entry = self._by_source.get(real)
        if entry is None:
            same = [s for s in self.manifest["shards"] if os.path.basename(s["source"]) == os.path.basename(real)
                    and Path(real).parent.name == Path(s["source"]).parent.name]
            if len(same) != 1:
                raise CacheMismatchError(
                    f"teacher cache {self.folder}: data shard {shard} has no companion "
                    f"({'several candidates' if same else 'not among the ' + str(len(self._by_source)) + ' cached shards'}); "
                    "cache this split with python -m data_tools.cache_teacher --split ...")
            entry = same[0]
        if not shard.startswith(("pipe:", "http://", "https://", "s3://", "gs://")):
            size = os.path.getsize(shard)
            if size != int(entry["source_bytes"]):
                raise CacheMismatchError(
                    f"teacher cache {self.folder}: data shard {shard} has {size} bytes, {entry['source_bytes']} when "
                    "its companion was written (manifest shards[].source_bytes); the shard changed: rebuild the cache")
        return entry

    def companion_path(self, shard: str) -> str:
        path = os.path.join(self.folder, self.entry_for(shard)["companion"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher cache {self.folder}: companion shard {path} of {shard} is missing")
        return path

    def companions(self, shards: Sequence[str]) -> Dict[str, str]:
        """Data shard -> companion shard, for all of them (errors at startup, not mid-run)."""
        return {s: self.companion_path(s) for s in shards}

    # -- per sample ------------------------------------------------------------------------------
    def align(self, record: bytes, labels: List[int], key: str):
        """Decode a record and pair its rows with the student's supervised tokens (``labels`` unshifted,
        -100 elsewhere). Returns ``(record_rows, labels, n_dropped)``: the cached rows of the kept
        tokens in order, and the labels with unmatched supervised tokens set to -100. Matching is the
        longest common subsequence of the two supervised-token lists (align.py's rule; identical lists,
        the usual case, take a fast path), so a student with another chat template still pairs the k-th
        supervised token of each side. Raises ValueError subclasses for the pipeline to count."""
        try:
            rec = fmt.decode(record)
        except fmt.CacheRecordError as e:
            raise SampleError(CACHE_CORRUPT, f"{key}: {e}") from None
        self._check_record(rec, key)
        pos = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
        student = [labels[i] for i in pos]
        teacher = rec.targets.tolist()
        if student == teacher:
            return rec, labels, 0
        keep_s, keep_t = matching_tokens(student, teacher)
        if not keep_s:
            raise SampleError(CACHE_TARGETS, f"{key}: the student shares no supervised token with the cached teacher")
        new = [IGNORE_INDEX] * len(labels)
        for i in keep_s:
            new[pos[i]] = labels[pos[i]]
        return rec.select(np.asarray(keep_t, dtype=np.int64)), new, len(student) + len(teacher) - 2 * len(keep_s)

    def _check_record(self, rec, key: str) -> None:
        if self.kind == "hidden":
            if not isinstance(rec, fmt.HiddenRecord) or rec.hidden.shape[1] != self.hidden_size \
                    or rec.dtype != self.manifest["hidden_dtype"]:
                raise SampleError(CACHE_CORRUPT, f"{key}: not a {self.manifest['hidden_dtype']} hidden-state record "
                                  f"of width {self.hidden_size}")
        elif not isinstance(rec, fmt.TopKRecord) or rec.k != self.k \
                or (rec.ids.size and int(rec.ids.max()) >= self.vocab_size):
            raise SampleError(CACHE_CORRUPT, f"{key}: not a top-k record with k={self.k} and ids within the vocabulary")

    def collate(self, records: Sequence) -> Dict[str, Any]:
        """Records in batch order (sample-major, token order: the order of ``loss_targets``)."""
        def cat(xs):
            return np.concatenate(xs) if xs else np.zeros((0,), dtype=np.int32)

        targets = torch.from_numpy(cat([r.targets for r in records]))
        if self.kind == "hidden":
            dtype = self.manifest["hidden_dtype"]
            if not records:
                records = [fmt.empty_hidden_record(self.hidden_size, dtype)]
            scale = np.concatenate([r.scale for r in records]) if dtype == "int8" else None
            hidden = fmt.hidden_tensor(np.concatenate([r.hidden for r in records]), dtype, scale)
            return {"hidden": hidden, "lm_head": self.lm_head, "targets": targets}
        return {"ids": torch.from_numpy(cat([r.ids for r in records])),
                "logprobs": torch.from_numpy(cat([r.logprobs for r in records])),
                "log_tail": torch.from_numpy(cat([r.log_tail for r in records])),
                "targets": targets, "tail": self.tail}

    def __repr__(self) -> str:
        what = f"hidden {self.hidden_size} x {self.manifest['hidden_dtype']}" if self.kind == "hidden" else f"k={self.k}"
        return f"TeacherCache({self.folder}, {what}, V={self.vocab_size}, shards={len(self._by_source)})"


__all__ = ["TeacherCache", "CACHE_MISSING", "CACHE_CORRUPT", "CACHE_TARGETS"]
