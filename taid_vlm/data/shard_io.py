"""Shard I/O: every byte the data layer reads from a shard or an index file goes through here.

- ``local_file(path)`` / ``open_file(path)``: the ONE place a shard or index path becomes a local file:
  remote URLs are fetched once per node into the node cache (node_cache.py: shared by the node's ranks
  and workers, size-limited, retried; a failed fetch is a FetchError, counted as ``fetch_error``).
- ``tar_members(fileobj, url, on_error)``: the members of a tar stream with their byte ranges. It is
  webdataset's ``tar_file_iterator`` (same filtering: regular files only, no ``__meta__`` members) plus
  each member's ``[start, end)`` in the tar, which webdataset's iterator does not expose.
- ``walk_shard`` / ``read_shard(path, skips)``: the raw samples of a whole shard in order (webdataset's
  ``group_by_keys`` over the members), read errors counted. Writers and checkers walk shards with it;
  the index (shard_index.py) is built by the same walk, so it counts samples exactly as it does.
- ``read_range(path, start, end)``: ONE raw sample from its byte range (seek + read), parsed by the same
  two functions, so a sample read by index is the very dict the whole-shard walk yields.
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import Any, Callable, Dict, Iterator, List, Optional

from webdataset.tariterators import group_by_keys

from .node_cache import DEFAULT_CACHE_MAX_BYTES, FetchError, NodeCache, default_cache_dir
from .shards import is_remote
from .skips import FETCH_ERROR, TAR_ERROR, TRUNCATED_TAR, SkipCounter

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default
GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of a gzip stream (a gzipped shard, companion or record)
_NODE_CACHE: List[Optional[NodeCache]] = [None]


def use_node_cache(cache: Optional[NodeCache]) -> None:
    """Make ``cache`` the node cache of this process (build_loader in the main process, SampleStream in each
    DataLoader worker: a worker may be spawned, so the stream carries the cache and sets it again)."""
    _NODE_CACHE[0] = cache


def node_cache() -> NodeCache:
    """This process's node cache: the one set by ``use_node_cache``, else the defaults (default_cache_dir)."""
    if _NODE_CACHE[0] is None:
        _NODE_CACHE[0] = NodeCache(default_cache_dir(), DEFAULT_CACHE_MAX_BYTES)
    return _NODE_CACHE[0]


def local_file(path: str) -> str:
    """A local path holding ``path``'s bytes: a local path itself; a remote URL (``http://``, ``pipe:`` ...)
    fetched once per node into the node cache (node_cache.py; FetchError after its retries)."""
    return path if not is_remote(path) else node_cache().local_path(path)


def open_file(path: str):
    """``path`` opened for binary reading; a remote file's cached copy is kept from eviction until closed."""
    return open(path, "rb") if not is_remote(path) else node_cache().open(path)


def read_error_reason(exn: BaseException) -> str:
    if isinstance(exn, FetchError):
        return FETCH_ERROR
    msg = str(exn).lower()
    return TRUNCATED_TAR if ("unexpected end" in msg or isinstance(exn, EOFError)) else TAR_ERROR


def tar_members(fileobj, url: str, on_error: Callable[[BaseException], Any]) -> Iterator[Dict[str, Any]]:
    """``{"fname", "data", "__url__", "start", "end"}`` per regular member, as webdataset's
    tar_file_iterator filters them. A read error calls ``on_error`` and ends the walk (a member cut
    mid-data is dropped; the members before it survive)."""
    try:
        stream = tarfile.open(fileobj=fileobj, mode="r|*")
        for info in stream:
            fname = info.name
            try:
                if not info.isreg() or fname is None:
                    continue
                if "/" not in fname and fname.startswith("__") and fname.endswith("__"):
                    continue
                if _SKIP_META.match(fname):
                    continue
                data = stream.extractfile(info).read()
                end = info.offset_data + (info.size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
                yield {"fname": fname, "data": data, "__url__": url, "start": info.offset, "end": end}
                stream.members = []
            except Exception as exn:  # webdataset's handler: count and go on to the next member
                on_error(exn)
    except (tarfile.TarError, EOFError, OSError) as exn:  # the header walk itself failed (cut or not a tar)
        on_error(exn)


def samples_with_ranges(files: Iterator[Dict[str, Any]], on_error) -> Iterator[tuple]:
    """webdataset's group_by_keys over ``tar_members``: ``(sample, (start, end))``, the byte range from
    its first member's header to its last member's end. (group_by_keys takes ``__url__`` from a sample's
    first member and ``__local_path__`` from its last: they carry the two offsets through it.)"""
    def marked():
        for f in files:
            f["__url__"] = (f["__url__"], f.pop("start"))
            f["__local_path__"] = f.pop("end")
            yield f

    def handler(exn):
        on_error(exn)
        return True

    for sample in group_by_keys(marked(), handler=handler):
        (url, start), end = sample["__url__"], sample.pop("__local_path__")
        sample["__url__"] = url
        yield sample, (start, end)


class ErrorOnce:
    """Counts a shard's read errors once per reason (one cut tar raises twice: member read, then the
    header walk) and remembers how many samples had been yielded when each was seen."""

    def __init__(self, path: str, skips: Optional[SkipCounter] = None):
        self.path, self.skips = path, skips
        self.yielded = 0
        self.seen: List[tuple] = []  # (reason, samples yielded before it)

    def __call__(self, exn: BaseException) -> None:
        reason = read_error_reason(exn)
        if reason not in [r for r, _ in self.seen]:
            self.seen.append((reason, self.yielded))
            if self.skips is not None:
                self.skips.add(reason, self.path)


def walk_shard(path: str, errors: ErrorOnce) -> Iterator[tuple]:
    """``(sample, (start, end))`` for every raw sample of a whole shard, in order."""
    try:
        f = open_file(path)
    except Exception as e:  # unreadable / vanished shard: counted, no samples
        errors(e)
        return
    with f:
        for sample, span in samples_with_ranges(tar_members(f, path, errors), errors):
            yield sample, span
            errors.yielded += 1


def read_shard(path: str, skips: SkipCounter, start: int = 0) -> Iterator[Dict[str, Any]]:
    """Raw samples of one whole shard; the first ``start`` are skipped undecoded. Read errors are counted
    in ``skips`` (truncated tar: the samples before the cut survive)."""
    for j, (sample, _) in enumerate(walk_shard(path, ErrorOnce(path, skips))):
        if j >= start:
            yield sample


def _ignore(exn: BaseException) -> None:
    """Errors inside an indexed range were counted in the index (shard_index.py), not again per read."""


def parse_range(data: bytes, url: str) -> Dict[str, Any]:
    """The raw sample held by the tar bytes of one sample's members."""
    for sample, _ in samples_with_ranges(tar_members(io.BytesIO(data), url, _ignore), _ignore):
        return sample
    raise RuntimeError(f"{url}: its index points at bytes that hold no sample; rebuild the index "
                       "(python -m data_tools.index_shards)")


def read_range(fileobj, url: str, start: int, end: int) -> Dict[str, Any]:
    """One raw sample: seek to its members and read exactly their bytes."""
    fileobj.seek(start)
    return parse_range(fileobj.read(end - start), url)
