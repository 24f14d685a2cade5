"""Read one raw sample by (shard, index in the shard): its byte range from the shard index, then only
those bytes (shard_io.read_range), paired with its cached-teacher companion record when a teacher
cache is read.

Companions (taid_vlm.teacher_cache) hold one record per raw data sample, under the same ``__key__``, in
the same order, and are gzip-compressed by default (no byte offsets to seek to). They are walked: a
worker reads a companion shard whole the first time it needs one of its records and keeps the last few
in memory. So companion bytes are still read once per worker that touches the shard (see
docs/data_at_scale.md); data shard bytes are read once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

from .node_cache import FetchError
from .prepare import COMPANION_FIELD, COMPANION_SKIP, READ_SKIP
from .shard_index import ShardIndex, load_spans
from .shard_io import local_file, open_file, read_range, read_shard
from .skips import FETCH_ERROR, SkipCounter

COMPANION_RECORD = "topk"  # the member of a companion record (top-k or hidden states: same name)
COMPANION_SKIP_RECORD = "skip"  # the member the cache writer leaves for a sample it skipped
TEACHER_CACHE_MISSING = "teacher_cache_missing"


class _Lru(OrderedDict):
    def __init__(self, size: int, close=None):
        super().__init__()
        self.size, self.close = size, close

    def put(self, key, value):
        self[key] = value
        while len(self) > self.size:
            _, old = self.popitem(last=False)
            if self.close is not None:
                self.close(old)
        return value

    def get_fresh(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None


class SampleReader:
    """Raw samples of indexed shards, one at a time. Lives in one DataLoader worker (open files)."""

    def __init__(self, indexes: Sequence[ShardIndex], companion_paths: Optional[Dict[str, str]] = None,
                 companion_skips: Optional[SkipCounter] = None):
        self.indexes = indexes
        self.companion_paths = companion_paths
        self.companion_skips = companion_skips if companion_skips is not None else SkipCounter()
        self._files = _Lru(16, close=lambda f: f.close())
        self._spans = _Lru(256)  # a block of shuffle_buffer samples spans shuffle_buffer / shard size shards
        self._companions = _Lru(4)

    def _open(self, s: int):
        f = self._files.get_fresh(s)
        if f is None:
            f = self._files.put(s, open_file(self.indexes[s].path))
        return f

    def read(self, s: int, j: int) -> Dict[str, Any]:
        """Raw sample ``j`` of shard ``s``; a remote shard that cannot be fetched gives a sample marked
        ``READ_SKIP`` (prepare counts it as ``fetch_error``, keyed by shard and index)."""
        ix = self.indexes[s]
        try:
            spans = self._spans.get_fresh(s)
            if spans is None:
                spans = self._spans.put(s, load_spans(ix, local_file(ix.path)))
            start, end = spans[j]
            raw = read_range(self._open(s), ix.path, int(start), int(end))
        except FetchError:
            return {"__key__": f"{ix.path}#{j}", READ_SKIP: FETCH_ERROR}
        if self.companion_paths is not None:
            self._pair(raw, ix.path, j)
        return raw

    def _pair(self, raw: Dict[str, Any], path: str, j: int) -> None:
        comp_path = self.companion_paths[path]
        records = self._companions.get_fresh(comp_path)
        if records is None:
            records = self._companions.put(comp_path, list(read_shard(comp_path, self.companion_skips)))
        if j >= len(records):  # the companion ended early (truncated): this sample cannot be used
            raw[COMPANION_SKIP] = TEACHER_CACHE_MISSING
            return
        paired = records[j]
        if paired.get("__key__") != raw.get("__key__"):
            raise RuntimeError(
                f"companion shard {comp_path} is misaligned with {path}: raw sample {j} has key "
                f"{paired.get('__key__')!r} there and {raw.get('__key__')!r} here; the companion was not written "
                "for this shard (rebuild the teacher cache)")
        if COMPANION_RECORD in paired:
            raw[COMPANION_FIELD] = paired[COMPANION_RECORD]
        elif COMPANION_SKIP_RECORD in paired:
            raw[COMPANION_SKIP] = bytes(paired[COMPANION_SKIP_RECORD]).decode("utf-8", "replace") or "teacher_cache_skip"
        else:  # a member lost to a cut: the key survived, the record did not
            raw[COMPANION_SKIP] = TEACHER_CACHE_MISSING

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

