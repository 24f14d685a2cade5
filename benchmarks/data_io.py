"""Bytes a rank and a node read per byte of the samples they train on, at simulated world sizes.

  python benchmarks/data_io.py [--worlds 1 8 64] [--workers 4] [--shards 64] [--per-shard 100]
  PYTHONPATH=/path/to/old/checkout python benchmarks/data_io.py --worlds 1 8    # the same on another checkout
  python benchmarks/data_io.py --startup 10000      # start-up time with 10,000 indexed shards
  python benchmarks/data_io.py --shuffle-quality    # distinct shards per global batch of 64 (no data read)

Writes ``--shards`` text shards of ``--per-shard`` samples of ~22 kB each (a short document plus a 22 kB
``bin`` member that the loader reads and ignores), then, for each world size W (8 ranks per node), runs the
train stream of every DataLoader worker of the ranks of node 0 IN THIS PROCESS, one worker at a time
(``SampleStream``'s worker body with (worker, num_workers)), and counts the bytes the process read
(``rchar`` of /proc/self/io: every read() of shards and index files) while each worker makes its
micro-batches, after a warm-up. Prints, per W: bytes read / bytes of the samples handed out, for rank 0,
the worst rank of node 0, and node 0 as a whole, and the process CPU seconds per sample handed out (tar
walking + parsing + tokenizing the short document). A ratio of 1.0 reads each sample's bytes once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("PYTHONPATH"):  # a PYTHONPATH picks the checkout to measure
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402

from taid_vlm.data import build_loader  # noqa: E402
from taid_vlm.spec import InputSpec  # noqa: E402
from taid_vlm.tokenizer import build_tiny_tokenizer  # noqa: E402

RANKS_PER_NODE = 8
PAYLOAD = 22_000


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def write_shards(folder: Path, n_shards: int, per_shard: int) -> list:
    paths = []
    for s in range(n_shards):
        path = folder / f"io-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as w:
            for i in range(per_shard):
                text = json.dumps({"text": f"red circle number {s * per_shard + i}"}).encode()
                w.write({"__key__": f"s{s}_{i}", "json": text, "bin": os.urandom(PAYLOAD)})
        paths.append(str(path))
    return paths


def worker_body(stream, w: int, W: int):
    """The generator a DataLoader worker runs (old walker or indexed reader, whichever is imported)."""
    if hasattr(stream, "_iter_train"):  # the walker (before the index)
        return stream._iter_train(w, W)
    from taid_vlm.data.train_stream import iter_train

    return iter_train(stream, w, W)


def measure_rank(paths, tok, rank: int, world: int, workers: int, warm: int, steps: int, batch: int, K: int):
    """(bytes read, samples handed out, CPU s) of one rank's workers over ``steps`` micro-batches each."""
    spec = InputSpec(tok)
    loader = build_loader(paths, spec, None, mode="train", text_only=True, seed=0, rank=rank, world_size=world,
                          num_workers=workers, batch_size=batch, shuffle_buffer=K, max_length=64)
    read = handed = 0
    cpu = 0.0
    for w in range(workers):
        gen = worker_body(loader.stream, w, workers)
        for _ in range(warm):
            next(gen)
        r0, c0 = rchar(), time.process_time()
        for _ in range(steps):
            item = next(gen)
            handed += len(item["indices"])
        read += rchar() - r0
        cpu += time.process_time() - c0
        gen.close()
    return read, handed, cpu


def startup(n: int, folder: Path) -> None:
    """Seconds from build_loader to the first batch with ``n`` indexed shards (8 samples each)."""
    from taid_vlm.data.shard_index import build_index, write_index

    paths = sorted(str(p) for p in folder.glob("st-*.tar"))
    if len(paths) != n:
        paths = []
        for s in range(n):
            path = folder / f"st-{s:06d}.tar"
            with wds.TarWriter(str(path), mtime=0) as w:
                for i in range(8):
                    w.write({"__key__": f"s{s}_{i}", "json": json.dumps({"text": f"doc {s} {i}"}).encode()})
            paths.append(str(path))
        t0 = time.perf_counter()
        write_index([build_index(p) for p in paths])
        print(f"indexed {n} shards in {time.perf_counter() - t0:.1f} s (data_tools.index_shards does the same)")
    tok = build_tiny_tokenizer()
    t0 = time.perf_counter()
    loader = build_loader(str(folder / "st-*.tar"), InputSpec(tok), None, text_only=True, num_workers=0,
                          batch_size=2, max_length=64)
    t1 = time.perf_counter()
    next(iter(loader))
    t2 = time.perf_counter()
    print(f"{n} indexed shards: build_loader {t1 - t0:.2f} s (expand + 1 summary + {n} stats), "
          f"first batch {t2 - t1:.2f} s, total {t2 - t0:.2f} s")


def shuffle_quality(K: int, batch: int = 64, batches: int = 2000) -> None:
    """Distinct shards feeding one global batch of ``batch`` samples, from the order alone (global_order)."""
    from taid_vlm.data.global_order import RawOrder

    for per_shard, n_shards in [(100, 1000), (1000, 100)]:
        order = RawOrder(0, K, [per_shard] * n_shards)
        distinct = [len({order.locate(b * batch + i)[0] for i in range(batch)}) for b in range(batches)]
        print(f"shuffle_buffer {K}, shards of {per_shard}: {sum(distinct) / batches:.1f} distinct shards per global "
              f"batch of {batch} (min {min(distinct)}, max {max(distinct)}, over {batches} batches)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--warm", type=int, default=3, help="micro-batches per worker before counting")
    ap.add_argument("--steps", type=int, default=8, help="micro-batches per worker counted")
    ap.add_argument("--data", help="reuse this shard folder (written if empty)")
    ap.add_argument("--startup", type=int, help="only measure start-up with this many indexed shards")
    ap.add_argument("--shuffle-quality", action="store_true", help="only count distinct shards per global batch")
    a = ap.parse_args()
    if a.shuffle_quality:
        return shuffle_quality(a.shuffle_buffer)
    folder = Path(a.data or tempfile.mkdtemp(prefix="data_io_"))
    folder.mkdir(parents=True, exist_ok=True)
    if a.startup:
        return startup(a.startup, folder)
    paths = sorted(str(p) for p in folder.glob("io-*.tar")) or write_shards(folder, a.shards, a.per_shard)
    sample_bytes = sum(os.path.getsize(p) for p in paths) / (len(paths) * a.per_shard)
    tok = build_tiny_tokenizer()
    build_loader(paths, InputSpec(tok), None, text_only=True, num_workers=0)  # index once (if this checkout has one)
    print(f"{len(paths)} shards x {a.per_shard} samples, {sample_bytes / 1e3:.1f} kB/sample, workers {a.workers}, "
          f"micro-batch {a.batch}, shuffle_buffer {a.shuffle_buffer}, {a.steps} micro-batches/worker counted")
    print(f"{'W':>4} {'rank 0':>8} {'worst rank':>11} {'node 0':>8} {'CPU ms/sample':>14}")
    for world in a.worlds:
        ranks = range(min(world, RANKS_PER_NODE))
        per_rank = [measure_rank(paths, tok, r, world, a.workers, a.warm, a.steps, a.batch, a.shuffle_buffer)
                    for r in ranks]
        ratios = [rd / (n * sample_bytes) for rd, n, _ in per_rank]
        node = sum(rd for rd, _, _ in per_rank) / (sum(n for _, n, _ in per_rank) * sample_bytes)
        cpu = 1e3 * sum(c for _, _, c in per_rank) / sum(n for _, n, _ in per_rank)
        print(f"{world:>4} {ratios[0]:>7.2f}x {max(ratios):>10.2f}x {node:>7.2f}x {cpu:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
