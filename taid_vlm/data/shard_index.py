"""The shard index: what the global order needs to know about shards without opening them.

Two files, both JSON, both written by data_tools.make_shards (as it writes shards) and by
data_tools.index_shards (once, for foreign shards such as img2dataset output):

- ``<shard>.idx`` (a sidecar per shard): the shard's size and mtime, its raw sample count, the byte
  range ``[start, end)`` of every raw sample (the members of one sample are contiguous), and the read
  errors its walk met (reason, samples before it). Loaded lazily by the worker that reads the shard.
- ``shards.index.json`` (one per folder): shard file name -> samples, bytes, mtime, errors. Start-up
  reads this one file per folder and stats each shard; it opens no shard and no sidecar.

Samples are counted by the same walk the readers use (shard_io.walk_shard: webdataset's
group_by_keys), so corrupt members, cut tars and empty files count exactly as a full read counts them.

Freshness: a LOCAL shard whose size or mtime differs from its entry, or that has no entry, is (re)indexed
at start with one warning naming it and the command that writes the index once (the tar is the truth;
indexing costs one read of it). A REMOTE shard (http://, pipe:, s3:// ...) needs its index next to it
(the summary or the sidecar, fetched like a shard); none is an error naming the command. Its sidecar's
size is checked against the fetched file when a worker first reads it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .node_cache import FetchError
from .shard_io import ErrorOnce, local_file, walk_shard
from .shards import is_remote

log = logging.getLogger(__name__)

INDEX_VERSION = 1
SUMMARY_NAME = "shards.index.json"
SIDECAR_SUFFIX = ".idx"
INDEX_COMMAND = "python -m data_tools.index_shards"


class StaleIndexError(ValueError):
    """An index that does not describe its shard (or a remote shard without one)."""


@dataclass
class ShardIndex:
    path: str
    size: int
    mtime_ns: int
    samples: int
    errors: List[Tuple[str, int]] = field(default_factory=list)  # (reason, raw samples before it)
    spans: Optional[List[Tuple[int, int]]] = None  # per raw sample [start, end); None until loaded

    def entry(self) -> dict:
        return {"samples": self.samples, "bytes": self.size, "mtime_ns": self.mtime_ns,
                "errors": [list(e) for e in self.errors]}

    def sidecar(self) -> dict:
        return {"version": INDEX_VERSION, **self.entry(), "starts": [s for s, _ in self.spans],
                "ends": [e for _, e in self.spans]}


def _stat(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def build_index(path: str) -> ShardIndex:
    """Walk one shard (read once) and index it."""
    errors = ErrorOnce(path)
    spans = [span for _, span in walk_shard(path, errors)]
    local = local_file(path)
    size, mtime = _stat(local) if os.path.exists(local) else (0, 0)
    return ShardIndex(path, size, mtime if not is_remote(path) else 0, len(spans), list(errors.seen), spans)


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)  # atomic: ranks indexing the same shard at once write the same bytes


def write_sidecar(ix: ShardIndex) -> None:
    """The sidecar alone (safe from several processes writing different shards of one folder)."""
    _write_json(ix.path + SIDECAR_SUFFIX, ix.sidecar())


def write_index(indexes: Sequence[ShardIndex]) -> None:
    """Sidecars for ``indexes`` and their folders' summaries (entries of other shards kept)."""
    by_folder: Dict[str, List[ShardIndex]] = {}
    for ix in indexes:
        write_sidecar(ix)
        by_folder.setdefault(os.path.dirname(ix.path), []).append(ix)
    for folder, group in by_folder.items():
        summary = os.path.join(folder, SUMMARY_NAME)
        shards = _read_json(summary).get("shards", {}) if os.path.exists(summary) else {}
        shards.update({os.path.basename(ix.path): ix.entry() for ix in group})
        _write_json(summary, {"version": INDEX_VERSION, "shards": dict(sorted(shards.items()))})


def _read_json(path: str) -> dict:
    with open(local_file(path)) as f:
        return json.load(f)


def _summary_of(folder: str, cache: Dict[str, dict]) -> dict:
    if folder not in cache:
        where = (posixpath if is_remote(folder) else os.path).join(folder, SUMMARY_NAME)
        try:
            cache[folder] = _read_json(where).get("shards", {})
        except (OSError, ValueError, FetchError):  # no summary (or unreadable): sidecars, else build
            cache[folder] = {}
    return cache[folder]


def _from_entry(path: str, e: dict) -> ShardIndex:
    return ShardIndex(path, int(e["bytes"]), int(e.get("mtime_ns", 0)), int(e["samples"]),
                      [(str(r), int(at)) for r, at in e.get("errors", [])])


def load_sidecar(path: str) -> dict:
    return _read_json(path + SIDECAR_SUFFIX)


def _lookup(path: str, summaries: Dict[str, dict]) -> Optional[ShardIndex]:
    folder, name = (posixpath if is_remote(path) else os.path).split(path)
    entry = _summary_of(folder, summaries).get(name)
    if entry is None:
        try:
            entry = load_sidecar(path)
        except (OSError, ValueError, FetchError):
            return None
    return _from_entry(path, entry)


def _fresh(ix: Optional[ShardIndex]) -> bool:
    return ix is not None and (ix.size, ix.mtime_ns) == _stat(ix.path)


def load_indexes(paths: Sequence[str], write: bool = True) -> List[ShardIndex]:
    """The index of every shard (start-up: one summary per folder + a stat per local shard). Local shards
    without a fresh index are indexed now (written next to them when ``write`` and the folder allows)."""
    summaries: Dict[str, dict] = {}
    found = [_lookup(p, summaries) for p in paths]
    missing = [p for p, ix in zip(paths, found) if ix is None and is_remote(p)]
    if missing:
        raise StaleIndexError(f"remote shard {missing[0]} has no index next to it ({len(missing)} such shards); "
                              f"index them once with `{INDEX_COMMAND} {missing[0]}` and upload the "
                              f"{SIDECAR_SUFFIX} files and {SUMMARY_NAME} beside the shards")
    todo = [i for i, (p, ix) in enumerate(zip(paths, found)) if not is_remote(p) and not _fresh(ix)]
    if todo:
        log.warning("indexing %d shard(s) with no up-to-date index (%s ...): one read each; run `%s %s` once to "
                    "skip this at start", len(todo), paths[todo[0]], INDEX_COMMAND, os.path.dirname(paths[todo[0]]))
        built = [build_index(paths[i]) for i in todo]
        for i, ix in zip(todo, built):
            found[i] = ix
        if write:
            try:
                write_index(built)
            except OSError as e:  # a read-only data folder: the index lives in memory for this run
                log.warning("could not write the shard index next to %s (%s)", paths[todo[0]], e)
    return found


def load_spans(ix: ShardIndex, local: str):
    """The per-sample byte ranges of one shard, ``[samples, 2]`` (its sidecar, checked against the file
    read; numpy: a worker keeps many shards' ranges at 16 bytes a sample)."""
    if ix.spans is not None:
        return ix.spans
    try:
        side = load_sidecar(ix.path)
    except (OSError, ValueError) as e:
        raise StaleIndexError(f"shard {ix.path} is in {SUMMARY_NAME} but its index {ix.path}{SIDECAR_SUFFIX} cannot be "
                              f"read ({type(e).__name__}); rebuild with `{INDEX_COMMAND} {ix.path}`") from None
    size = os.path.getsize(local)
    if int(side["bytes"]) != size or int(side["samples"]) != ix.samples:
        raise StaleIndexError(f"shard {ix.path} has {size} bytes and its index {ix.path}{SIDECAR_SUFFIX} says "
                              f"{side['bytes']} bytes / {side['samples']} samples (summary: {ix.samples}): the "
                              f"shard changed since it was indexed; rebuild with `{INDEX_COMMAND} {ix.path}`")
    return np.array([side["starts"], side["ends"]], dtype=np.int64).reshape(2, -1).T
