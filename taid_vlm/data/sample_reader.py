"""Read one raw sample by (shard, index in the shard): its byte range from the shard index, then only
those bytes (shard_io.read_range), paired with its cached-teacher companion record when a teacher
cache is read.

Companions (taid_vlm.teacher_cache) hold one record per raw data sample, under the same ``__key__``, in
the same order. A plain-tar companion (``cache_teacher --compress records`` or ``none``) is indexed like a
data shard and its records are read by byte range too. A gzip companion (``--compress stream``, the
default) has no byte offsets to seek to: a worker reads it whole the first time it needs one of its
records and keeps the last few in memory, so its bytes are read again whenever a worker's samples move
among more shards than that (docs/data_at_scale.md).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

from .node_cache import FetchError
from .prepare import COMPANION_FIELD, COMPANION_SKIP, READ_SKIP
from .shard_index import ShardIndex, load_indexes, load_spans
from .shard_io import GZIP_MAGIC, local_file, open_file, read_range, read_shard
from .skips import FETCH_ERROR, SkipCounter

COMPANION_RECORD = "topk"  # the member of a companion record (top-k or hidden states: same name)
COMPANION_SKIP_RECORD = "skip"  # the member the cache writer leaves for a sample it skipped
TEACHER_CACHE_MISSING = "teacher_cache_missing"
GZIP_COMPANIONS_KEPT = 4  # whole gzip companions a worker keeps decoded


def index_plain_companions(paths, write: bool) -> Dict[str, ShardIndex]:
    """The shard index of every companion that is a plain tar (written by the cache writer; built now,
    once, for a cache from before it did): their records are then read by byte range. Gzip ones: none."""
    plain = []
    for path in sorted(set(paths)):
        with open_file(path) as f:
            if f.read(2) != GZIP_MAGIC:
                plain.append(path)
    return dict(zip(plain, load_indexes(plain, write=write))) if plain else {}


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
                 companion_skips: Optional[SkipCounter] = None,
                 companion_indexes: Optional[Dict[str, ShardIndex]] = None):
        """``companion_indexes``: the plain-tar companions' index (index_plain_companions), read by range."""
        self.indexes = indexes
        self.companion_paths = companion_paths
        self.companion_skips = companion_skips if companion_skips is not None else SkipCounter()
        self.companion_indexes = companion_indexes or {}
        # keyed by shard number, or by path for companions
        self._files = _Lru(16, close=lambda f: f.close())
        self._spans = _Lru(256)  # a block of shuffle_buffer samples spans shuffle_buffer / shard size shards
        self._companions = _Lru(GZIP_COMPANIONS_KEPT)
        self._errors_counted: set = set()  # plain companions whose read errors this worker has counted

    def _range(self, key, ix: ShardIndex, j: int) -> Dict[str, Any]:
        """Raw sample ``j`` of the indexed tar ``ix`` (``key``: its slot in the span and file caches)."""
        spans = self._spans.get_fresh(key)
        if spans is None:
            spans = self._spans.put(key, load_spans(ix, local_file(ix.path)))
        f = self._files.get_fresh(key)
        if f is None:
            f = self._files.put(key, open_file(ix.path))
        start, end = spans[j]
        return read_range(f, ix.path, int(start), int(end))

    def read(self, s: int, j: int) -> Dict[str, Any]:
        """Raw sample ``j`` of shard ``s``; a remote shard that cannot be fetched gives a sample marked
        ``READ_SKIP`` (prepare counts it as ``fetch_error``, keyed by shard and index)."""
        ix = self.indexes[s]
        try:
            raw = self._range(s, ix, j)
        except FetchError:
            return {"__key__": f"{ix.path}#{j}", READ_SKIP: FETCH_ERROR}
        if self.companion_paths is not None:
            self._pair(raw, ix.path, j)
        return raw

    def _companion_record(self, comp_path: str, j: int) -> Optional[Dict[str, Any]]:
        """Record ``j`` of a companion, None past its end (a truncated companion)."""
        ix = self.companion_indexes.get(comp_path)
        if ix is None:  # gzip: read whole, the last few kept
            records = self._companions.get_fresh(comp_path)
            if records is None:
                records = self._companions.put(comp_path, list(read_shard(comp_path, self.companion_skips)))
            return records[j] if j < len(records) else None
        if comp_path not in self._errors_counted:  # as the whole read counts them: once per worker
            self._errors_counted.add(comp_path)
            for reason, _ in ix.errors:
                self.companion_skips.add(reason, comp_path)
        return self._range(comp_path, ix, j) if j < ix.samples else None

    def _pair(self, raw: Dict[str, Any], path: str, j: int) -> None:
        comp_path = self.companion_paths[path]
        paired = self._companion_record(comp_path, j)
        if paired is None:  # the companion ended early (truncated): this sample cannot be used
            raw[COMPANION_SKIP] = TEACHER_CACHE_MISSING
            return
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

