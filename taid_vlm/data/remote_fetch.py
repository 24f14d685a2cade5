"""One attempt at copying a remote file (a shard, an index sidecar) into an open local file.

Which tool opens which URL, and why:

- ``http://`` / ``https://``: ``requests`` (streamed). It gives what a bounded, checkable transfer needs
  and webdataset's ``gopen`` (a ``curl`` pipe with ``--retry 30`` and no read timeout) does not: a
  connect timeout and a read (stall) timeout, the status code, and the ``Content-Length`` to check a
  transfer cut short against (urllib3 also enforces it).
- ``pipe:CMD``: CMD runs in a shell with its stdout going straight into the file (as webdataset's
  ``pipe:`` does, minus the pipe), in its own process group, killed whole after ``pipe_timeout_s``; a
  non-zero exit status is a failed attempt. This is how object stores are read with their own tools:
  ``pipe:aws s3 cp s3://bucket/shard-000001.tar -``, ``pipe:gsutil cat gs://...``.
- anything else (``gs://``, ``hf://``, ``ais://`` ...): webdataset's ``gopen``, copied as it comes;
  ``s3://`` has no gopen handler: use the ``pipe:aws s3 cp ... -`` form above.

Every failure is a ``TransferError`` whose message says what went wrong; retrying is the caller's job
(node_cache.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from typing import BinaryIO

CHUNK = 1 << 20


class TransferError(Exception):
    """One fetch attempt failed (HTTP status, connection error or timeout, short transfer, command exit)."""


def fetch_once(url: str, out: BinaryIO, *, connect_timeout_s: float, read_timeout_s: float,
               pipe_timeout_s: float) -> int:
    """Write the bytes at ``url`` into ``out`` (positioned at 0, empty); return their number."""
    if url.startswith(("http://", "https://")):
        return _http(url, out, (connect_timeout_s, read_timeout_s))
    if url.startswith("pipe:"):
        return _pipe(url[len("pipe:"):], out, pipe_timeout_s)
    return _gopen(url, out)


def _http(url: str, out: BinaryIO, timeout: tuple) -> int:
    import requests

    n, expected = 0, None
    try:
        # identity: the stored bytes are the object's bytes, and Content-Length counts exactly them
        with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}) as r:
            if r.status_code != 200:
                raise TransferError(f"HTTP {r.status_code} {r.reason}")
            expected = r.headers.get("Content-Length")
            for chunk in r.iter_content(CHUNK):
                out.write(chunk)
                n += len(chunk)
    except requests.RequestException as e:
        raise TransferError(f"{type(e).__name__}: {e}") from e
    if expected is not None and n != int(expected):
        raise TransferError(f"transfer cut short: {n} of {expected} bytes")
    return n


def _pipe(cmd: str, out: BinaryIO, timeout_s: float) -> int:
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, shell=True, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the shell and whatever it started
            proc.wait()
            raise TransferError(f"command still running after {timeout_s:g} s (killed): {cmd}") from None
        if code != 0:
            err.seek(0)
            tail = err.read()[-500:].decode("utf-8", "replace").strip()
            raise TransferError(f"command exited with status {code}: {cmd}" + (f": {tail}" if tail else ""))
    out.flush()
    return os.fstat(out.fileno()).st_size


def _gopen(url: str, out: BinaryIO) -> int:
    from webdataset.gopen import gopen

    try:
        with gopen(url) as stream:
            shutil.copyfileobj(stream, out, CHUNK)
    except Exception as e:  # gopen's handlers raise whatever their tool raises
        hint = " (s3:// is read with pipe:aws s3 cp s3://... -)" if url.startswith("s3://") else ""
        raise TransferError(f"{type(e).__name__}: {e}{hint}") from e
    out.flush()
    return os.fstat(out.fileno()).st_size
