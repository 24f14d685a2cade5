"""Write ``(key, images, fields)`` records into WebDataset shards (webdataset's ShardWriter), counting
the records that arrive as skips, and index them (shard_index.py). Used by data_tools.make_shards and the
synthetic-data generator."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

import webdataset as wds

from .shard_index import build_index, write_index
from .skips import SampleError, SkipCounter

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def _clean_key(key: str, seen: set) -> str:
    k = _KEY_BAD.sub("_", key) or "sample"  # webdataset splits names at the first dot: no dots, no slashes
    base, n = k, 1
    while k in seen:
        k, n = f"{base}_{n}", n + 1
    seen.add(k)
    return k


def raw_sample(key: str, images: List[Tuple[str, bytes]], fields: Dict[str, Any]) -> Dict[str, Any]:
    """The WebDataset sample (field name -> bytes) written for a record."""
    sample: Dict[str, Any] = {"__key__": key}
    if len(images) == 1:
        sample[images[0][0]] = images[0][1]
    else:
        for i, (ext, data) in enumerate(images):
            sample[f"{i}.{ext}"] = data
    if "txt" in fields:
        sample["txt"] = fields["txt"].encode("utf-8")
    if "json" in fields:
        sample["json"] = json.dumps(fields["json"], ensure_ascii=False).encode("utf-8")
    return sample


def write_shards(records: Iterable[Any], out: Path, prefix: str = "shard", maxcount: int = 10000,
                 maxsize: float = 1e9, mtime: float = 0.0, index: bool = True) -> Dict[str, Any]:
    """Write records (``(key, images, fields)`` or ``(key, SampleError)``) into shards; return a report.
    ``index``: also write the shard index beside them (shard_index.py)."""
    out.mkdir(parents=True, exist_ok=True)
    skips, seen, written, inputs, shards = SkipCounter(), set(), 0, 0, []
    writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0,
                             mtime=mtime, post=shards.append)
    try:
        for rec in records:
            inputs += 1
            if isinstance(rec[1], SampleError):
                skips.add(rec[1].reason, rec[0])
                continue
            key, images, fields = rec
            writer.write(raw_sample(_clean_key(key, seen), images, fields))
            written += 1
    finally:
        writer.close()
    if written == 0:  # ShardWriter opens its first shard eagerly; do not leave an empty tar behind
        for s in shards:
            os.remove(s)
        shards = []
    if index and shards:
        write_index([build_index(str(s)) for s in shards])
    return {"inputs": inputs, "written": written, "skipped": skips.total, "skipped_by_reason": skips.as_dict(),
            "skipped_examples": skips.examples, "shards": [str(s) for s in shards]}
