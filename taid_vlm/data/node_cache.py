"""A node-local cache of remote files: each remote shard (or index sidecar) is fetched once per node.

``NodeCache(root, max_bytes)`` is shared by every rank and DataLoader worker of a node through the
file system: ``root`` must be a node-local folder (``default_cache_dir()``: ``$TMPDIR/taid_vlm_shards``,
the temp folder, which batch schedulers point at node-local disk; a home folder is often a network file
system, where the locks below are not reliable).

- ``local_path(url)``: a local path is returned as it is; a remote URL (``is_remote``: ``http(s)://``,
  ``pipe:``, ``gs://`` ...; how each is read: remote_fetch.py) is fetched into ``root`` unless it is
  there already, and its cached path returned. ``open(url)``: the same, opened for reading and marked
  in use (a shared ``flock`` on the open file) until it is closed: eviction leaves it alone.
- Once per node: a lock file per URL (``filelock``). The first caller fetches, the others wait on the
  lock and then find the file. A fetch writes a temporary name, fsyncs it and renames it into place
  (atomic), so a partial or corrupted transfer is never visible under the cached name; a fetcher that
  died mid-write leaves a temporary file that the next fetcher removes.
- Retries: ``retries`` more attempts after the first, waiting ``backoff_s * 2**i`` between them, on any
  failure (HTTP 404 or 5xx, connection reset, timeout, a transfer cut short of its Content-Length, a
  command's non-zero exit). Then ``FetchError`` (the reader counts a ``fetch_error`` skip naming the URL
  and the stream goes on), and a marker makes every other caller on the node get the same error at once
  for ``failure_ttl_s`` instead of fetching again; after that the URL is tried anew.
- Size: after each fetch or open, while the complete files exceed ``max_bytes``, files not in use are
  removed, least recently used first (every use touches a file's mtime). A file larger than
  ``max_bytes`` on its own is still fetched and read, and is the first to go once nobody reads it.
- Nothing hangs: connect and read timeouts for HTTP, a wall-clock limit for ``pipe:`` commands.

The cache keys files by URL: an object changed at the same URL needs the cached copy removed (or another
``root``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from .remote_fetch import TransferError, fetch_once
from .shards import is_remote

log = logging.getLogger(__name__)


class FetchError(Exception):
    """A remote file that could not be fetched (after the retries); the message names the URL and why."""

    def __init__(self, url: str, why: str):
        super().__init__(f"could not fetch {url}: {why}")
        self.url, self.why = url, why


DEFAULT_CACHE_MAX_BYTES = 64 << 30  # data.cache_max_gb's default (tests/test_node_cache.py keeps the two equal)


def default_cache_dir() -> str:
    """``$TMPDIR/taid_vlm_shards`` (the system temp folder without TMPDIR): node-local on clusters."""
    return os.path.join(tempfile.gettempdir(), "taid_vlm_shards")


@dataclass(frozen=True)
class NodeCache:
    root: str
    max_bytes: int
    retries: int = 3
    backoff_s: float = 1.0
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 120.0
    pipe_timeout_s: float = 3600.0
    failure_ttl_s: float = 300.0

    # -- the public two ------------------------------------------------------------------------------
    def local_path(self, url: str) -> str:
        """``url`` itself when local; else the cached copy's path (fetched now if missing)."""
        if not is_remote(url):
            return url
        with self._locked(url):
            path = self._present(url)
        self.evict()
        return str(path)

    def open(self, url: str) -> BinaryIO:
        """The file at ``url`` opened for binary reading (webdataset's gopen for a local path); a cached copy
        stays in use, never evicted, until the returned file is closed."""
        if not is_remote(url):
            from webdataset.gopen import gopen

            return gopen(url)
        with self._locked(url):
            f = open(self._present(url), "rb")
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # taken under the URL's lock: no eviction in between
        self.evict()
        return f

    # -- names -------------------------------------------------------------------------------------
    def entry(self, url: str) -> Path:
        """Where ``url`` is cached: a hash of the whole URL (unique) + its last part (readable)."""
        tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
        return Path(self.root) / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{tail}"

    @staticmethod
    def _aside(path: Path, what: str) -> Path:
        """Lock, failure marker and temporary files: dot names, never counted as cached files."""
        return path.with_name(f".{path.name}.{what}")

    # -- fetch once --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, url: str) -> Iterator[None]:
        from filelock import FileLock

        Path(self.root).mkdir(parents=True, exist_ok=True)
        with FileLock(self._aside(self.entry(url), "lock")):
            yield

    def _present(self, url: str) -> Path:
        """The cached file, fetched if missing (the caller holds the URL's lock)."""
        path = self.entry(url)
        if path.exists():
            with contextlib.suppress(OSError):  # a cache folder shared read-only: no recency, still served
                os.utime(path)  # recently used
            return path
        failed = self._aside(path, "failed")
        with contextlib.suppress(FileNotFoundError):
            if time.time() - failed.stat().st_mtime < self.failure_ttl_s:
                raise FetchError(url, failed.read_text())
        for stale in path.parent.glob(f".{path.name}.part*"):  # a fetcher that died mid-write
            stale.unlink(missing_ok=True)
        try:
            self._fetch(url, path)
        except FetchError as e:
            failed.write_text(e.why)
            raise
        failed.unlink(missing_ok=True)
        return path

    def _fetch(self, url: str, path: Path) -> None:
        tmp = self._aside(path, f"part{os.getpid()}")
        why = ""
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                with open(tmp, "wb") as out:
                    try:
                        n = fetch_once(url, out, connect_timeout_s=self.connect_timeout_s,
                                       read_timeout_s=self.read_timeout_s, pipe_timeout_s=self.pipe_timeout_s)
                        out.flush()
                        os.fsync(out.fileno())
                    except TransferError as e:
                        why = str(e)
                        log.warning("fetch %s, attempt %d of %d: %s", url, attempt + 1, self.retries + 1, why)
                        continue
                os.replace(tmp, path)  # atomic: the cached name only ever holds a complete transfer
                _fsync_dir(path.parent)
                log.debug("fetched %s (%d bytes) into %s", url, n, path)
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise FetchError(url, f"{why} (after {self.retries + 1} attempts)")

    # -- size limit --------------------------------------------------------------------------------
    def evict(self) -> int:
        """Remove files not in use until the cached files fit ``max_bytes``: larger-than-the-limit files
        first, then least recently used. Returns the bytes the cached files take afterwards."""
        from filelock import FileLock

        root = Path(self.root)
        if not root.is_dir():
            return 0
        with FileLock(root / ".evict.lock"):
            files = []
            for p in root.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if not p.name.startswith("."):
                        files.append((p, p.stat()))
            total = sum(st.st_size for _, st in files)
            for p, st in sorted(files, key=lambda f: (f[1].st_size <= self.max_bytes, f[1].st_mtime)):
                if total <= self.max_bytes:
                    break
                if self._remove_unused(p):
                    total -= st.st_size
        return total

    def _remove_unused(self, path: Path) -> bool:
        from filelock import FileLock, Timeout

        lock = FileLock(self._aside(path, "lock"))
        try:
            lock.acquire(timeout=0)  # being fetched or opened right now: leave it
        except Timeout:
            return False
        try:
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a reader holds it open
                    return False
                path.unlink()
                return True
        except FileNotFoundError:
            return False
        finally:
            lock.release()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it keeps the new name)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
