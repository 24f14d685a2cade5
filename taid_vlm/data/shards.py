"""Shard specs -> an explicit, sorted list of shard paths, checked at startup.

A spec is a brace pattern (``data/shard-{000000..000099}.tar``), a folder (all ``*.tar`` inside,
recursively), a glob (``data/**/*.tar``), a comma-separated string of those, or a list of any of them.
Remote URLs (``pipe:``, ``http(s)://``, ``s3://`` ...) are passed through unchecked: webdataset's gopen
opens them. A local path that does not exist, or a spec that expands to nothing, is a clear error that
names the path.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, List, Union

import braceexpand  # installed with webdataset; the same expansion webdataset uses

ShardSpec = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://", "ais://")


def is_remote(s: str) -> bool:
    return s.startswith(_REMOTE_PREFIXES)


def _expand_one(item: str) -> List[str]:
    out: List[str] = []
    for s in braceexpand.braceexpand(item):
        if is_remote(s):
            out.append(s)
        elif os.path.isdir(s):
            found = sorted(str(p) for p in Path(s).rglob("*.tar"))
            if not found:
                raise FileNotFoundError(f"shard folder {s!r} contains no .tar files")
            out.extend(found)
        elif glob.has_magic(s):
            found = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"shard glob {s!r} matches no files")
            out.extend(found)
        elif os.path.isfile(s):
            out.append(s)
        else:
            raise FileNotFoundError(f"shard {s!r} does not exist")
    return out


def expand_shards(spec: ShardSpec) -> List[str]:
    """Expand a shard spec into a list of shard paths (order kept; duplicates dropped)."""
    if spec is None:
        raise ValueError("empty shard spec: no shards given")
    if isinstance(spec, (str, os.PathLike)):
        items = [p for p in str(spec).split(",") if p.strip()]
    else:
        items = [str(p) for p in spec]
    items = [i.strip() for i in items if str(i).strip()]
    if not items:
        raise ValueError(f"empty shard spec: {spec!r}")
    out: List[str] = []
    seen = set()
    for item in items:
        for s in _expand_one(os.path.expanduser(item)):
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out
