"""Peak memory of the teacher-cache writer on one VLM shard of 384 px images.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cache_memory_bench.py [--n 1000] [--out /tmp/cache_mem]

Writes one shard of --n synthetic-shapes samples at 384 px (captions, Q/A, two-image questions: ~1.25
images per sample), builds the tiny VLM teacher with a 384 px open_clip tower (patch 32: 144 image
tokens), caches its top-16 in a fresh process, and prints that process's peak RSS (ru_maxrss) and the
companion's size. Measured 2026-11-29 on the 2-core CPU machine, 1,000 samples, batch 16:
before streaming (every rendered sample of the shard held until the shard was done) 3,231 MiB, 89 s;
streaming (two batches of look-ahead) 1,232 MiB, 85 s; the companion shards are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time, torch
from taid_vlm.config import load_config
from taid_vlm.teacher_cache_writer import write_cache
cfg = load_config(sys.argv[1])
torch.manual_seed(0)
start = time.time()
m = write_cache(cfg, sys.argv[2], k=16, splits=("train",), batch_size=16, overwrite=True)
print("RESULT", json.dumps({"seconds": round(time.time() - start, 1), "samples": m["totals"]["samples"],
      "companion_bytes": m["totals"]["bytes"], "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/cache_mem"))
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from taid_vlm.data.synthetic import synth

    out = a.out.resolve()
    if not (out / "data" / "manifest.json").is_file():
        synth(out / "data", a.n, seed=0, size=384, val_fraction=0.0, maxcount=a.n)
    teacher = (REPO / "configs/models/tiny_vlm_teacher.yaml").read_text()
    teacher = re.sub(r"image_size: 32, patch_size: 8", "image_size: 384, patch_size: 32", teacher)
    teacher = teacher.replace("max_position_embeddings: 512", "max_position_embeddings: 1024")
    (out / "teacher384.yaml").write_text(teacher)
    (out / "run.yaml").write_text(json.dumps({
        "seed": 0, "output_dir": str(out / "run"), "teacher": {"model": str(out / "teacher384.yaml")},
        "student": {"model": str(REPO / "configs/models/tiny_vlm_student.yaml")},
        "data": {"train": str(out / "data" / "train"), "max_length": 640, "num_workers": 0},
        "loss": {"name": "taid"}, "train": {"total_steps": 1, "micro_batch_size": 16}}))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out / "run.yaml"), str(out / "cache")], env=env,
                          capture_output=True, text=True, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return 1
    print(line[len("RESULT "):])
    return 0


if __name__ == "__main__":
    sys.exit(main())
