"""Index WebDataset shards once, so training start-up opens no shard and each rank reads only its samples.

  python -m data_tools.index_shards 'data/shard-{000000..000999}.tar'     # writes the index next to them
  python -m data_tools.index_shards data/ --verify                         # checks an existing index
  python -m data_tools.index_shards 'https://host/ds/shard-{0000..0099}.tar' --out idx/   # remote: upload idx/*

Writes, per shard, ``<shard>.idx`` (its raw samples' byte ranges, size, mtime, read errors) and, per
folder, ``shards.index.json`` (shard -> samples, bytes, errors), as taid_vlm.data.shard_index describes.
Samples are counted by the loader's own walk (webdataset's tar iterator and group_by_keys), so the index
of img2dataset output or any foreign shard matches what a full read finds. data_tools.make_shards writes
the index itself. Remote shards (http://, pipe:, s3:// ...) are fetched once and their index files written
into ``--out``, to be put next to the shards. ``--verify`` re-walks every shard and compares it with its
index (exit status 1 on any difference, naming the shard). A user error is one ``error:`` line, status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from taid_vlm.data.shard_index import ShardIndex, build_index, load_sidecar, write_index
from taid_vlm.data.shards import expand_shards, is_remote
from taid_vlm.errors import UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.index_shards", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("pattern", nargs="+", help="shard spec(s): brace pattern, folder, glob, list, URL")
    ap.add_argument("--verify", action="store_true", help="compare the existing index with the shards; write nothing")
    ap.add_argument("--out", help="folder for the index files of remote shards (required for remote shards)")
    return ap


def _relocated(ix: ShardIndex, out: str) -> ShardIndex:
    return ShardIndex(os.path.join(out, os.path.basename(ix.path)), ix.size, ix.mtime_ns, ix.samples, ix.errors,
                      ix.spans)


def verify(ix: ShardIndex) -> Optional[str]:
    """None when the shard's sidecar matches a fresh walk of it, else what differs."""
    try:
        side = load_sidecar(ix.path)
    except (OSError, ValueError) as e:
        return f"no readable index ({e})"
    want = ix.sidecar()
    if not is_remote(ix.path):
        want.pop("mtime_ns")
        side.pop("mtime_ns", None)
    diff = [k for k in want if side.get(k) != want[k]]
    return f"index differs in {', '.join(diff)}" if diff else None


def _main(argv: List[str]) -> int:
    a = build_parser().parse_args(argv)
    paths = expand_shards(a.pattern)
    remote = [p for p in paths if is_remote(p)]
    if remote and not a.out and not a.verify:
        raise UserError("remote shards need --out (a folder for their index files, to upload next to them)",
                        remote[0])
    t0 = time.perf_counter()
    built = [build_index(p) for p in paths]
    if a.verify:
        bad = [(ix.path, why) for ix in built for why in [verify(ix)] if why]
        for path, why in bad:
            print(f"MISMATCH {path}: {why}")
        print(f"verified {len(built)} shard(s): {len(bad)} mismatch(es)")
        return 1 if bad else 0
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    write_index([_relocated(ix, a.out) if is_remote(ix.path) else ix for ix in built])
    errors = sum(len(ix.errors) for ix in built)
    print(f"indexed {len(built)} shard(s), {sum(ix.samples for ix in built)} samples, {errors} read error(s) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
