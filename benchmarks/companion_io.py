"""Teacher-cache companions: bytes read and CPU per sample, gzip (read whole) vs records gzipped one by one
and plain tar (both read by byte range).

  python benchmarks/companion_io.py [--shards 32] [--per-shard 50] [--k 64] [--steps 40]

Writes ``--shards`` synthetic text shards (the tiny text recipe's data) and caches the tiny text teacher on
them three times (top-k; ``--compress stream``, ``records``, ``none``), then runs ONE train-stream worker in this process (the body a
DataLoader worker runs) over ``--steps`` micro-batches of 4 after 5 of warm-up, with a shuffle_buffer of one
shard's worth and of all shards, and prints kB read per sample (``rchar``: data shards, companions, index
files), the companion payload per sample (6k + 8 bytes per supervised token) for scale, and CPU ms per sample.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from data_io import rchar, worker_body  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=50)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, help="work folder (default: a new temporary one)")
    a = ap.parse_args()

    from taid_vlm.config import load_config
    from taid_vlm.data import build_loader
    from taid_vlm.data.synthetic import synth
    from taid_vlm.teacher_cache import TeacherCache
    from taid_vlm.teacher_cache_writer import write_cache
    from taid_vlm.train.components import build_role_model

    out = a.out or Path(tempfile.mkdtemp(prefix="companion_io_"))
    data = out / "data"
    if not (data / "train").is_dir():
        synth(data, a.shards * a.per_shard, val_fraction=0.0, maxcount=a.per_shard, text_only=True)
    models = REPO / "configs" / "models"
    cfg = load_config(data={"teacher": {"model": str(models / "tiny_text_teacher.yaml")},
                            "student": {"model": str(models / "tiny_text_student.yaml")},
                            "data": {"train": str(data / "train"), "val": None, "text_only": True, "max_length": 256}})
    caches = {}
    for name, compress in (("gzip", "stream"), ("records", "records"), ("plain", "none")):
        folder = out / f"cache_{name}"
        if not (folder / "manifest.json").exists():
            write_cache(cfg, folder, k=a.k, splits=("train",), compress=compress)
        caches[name] = TeacherCache(folder)
    spec = build_role_model(cfg.student.model, "student").input_spec
    shards = sorted(str(p) for p in (data / "train").glob("*.tar"))
    print(f"{len(shards)} shards x {a.per_shard} samples, top-{a.k} cache, 1 worker, micro-batch 4, "
          f"{a.steps} micro-batches counted")
    print(f"{'shuffle_buffer':>14} {'companions':>10} {'kB read/sample':>15} {'payload kB/sample':>18} {'CPU ms/sample':>14}")
    for K in (a.per_shard, a.shards * a.per_shard):
        for name, cache in caches.items():
            loader = build_loader(shards, spec, None, mode="train", text_only=True, batch_size=4, num_workers=0,
                                  shuffle_buffer=K, max_length=256, companion=cache)
            gen = worker_body(loader.stream, 0, 1)
            for _ in range(5):
                next(gen)
            r0, c0, handed = rchar(), time.process_time(), 0
            for _ in range(a.steps):
                item = next(gen)
                handed += int(item["teacher_topk"]["ids"].shape[0]) * (6 * a.k + 8)  # the records' payload
            read, cpu = rchar() - r0, time.process_time() - c0
            gen.close()
            n = 4 * a.steps
            print(f"{K:>14} {name:>10} {read / n / 1e3:>15.1f} {handed / n / 1e3:>18.1f} {1e3 * cpu / n:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
