"""Teacher cache: storage per supervised token, training throughput, fidelity of each cache format,
and students trained from each format vs the online teacher.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cache_bench.py [--steps 30] [--out /tmp/cache_bench]
        [--fidelity-tokens 32] [--e2e-steps 150 --teacher-steps 300 --e2e-losses taid,rkl] [--text-bed CHECKOUT]

1. Storage: caches the tiny text recipe's teacher (V = 512) at k = 64 and k = V, gzip (default) and
   plain tar; reports the payload (6k + 8 bytes) and the bytes on disk per supervised token. Also
   encodes synthetic Zipf-teacher records at Qwen2's V = 151,936 (k = 64, 40 tokens per sample) to show
   the compression on a realistic id range.
2. Throughput: trains the tiny text recipe for --steps steps with the online teacher and from the k=64
   cache; reports the median tokens/s of the logged steps after the first 3.
3. Fidelity (cache_fidelity.py): relative error of the loss and its gradient vs the online teacher, per
   format (top-k with a uniform or student-shaped tail, top-k + sampled tail tokens, hidden states in
   bf16 / fp16 / fp32 / int8) and loss (TAID t = 0.4 and 0.8, RKL, FKL), at V = 151,936, on
   --fidelity-tokens tokens of a Zipf and of a low-rank (h @ W) peaked teacher, far and near students
   (with --text-bed: also on the real-text bed's trained teacher); the train-time cost of the hidden-state
   cache's teacher matmul in the chunked loss.
4. End to end (cache_e2e.py, when --e2e-steps > 0): TAID and RKL students trained --e2e-steps steps
   online and from each cache format on the tiny text bed with a CE-trained teacher; held-out KL
   against the online teacher.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}


def sh(cmd):
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc


def cache(out: Path, k: int, compress: bool) -> dict:
    if not (out / "manifest.json").exists():
        sh([PY, "-m", "data_tools.cache_teacher", "configs/tiny_text.yaml", "--k", str(k), "--out", str(out),
            "--split", "train"] + ([] if compress else ["--no-compress"]))
    return json.loads((out / "manifest.json").read_text())


def zipf_records(v=151_936, k=64, samples=200, tokens=40):
    """On-disk bytes/token of records from a peaked teacher at Qwen2's vocabulary size."""
    import numpy as np
    import torch

    from taid_vlm.teacher_cache.format import encode

    from taid_vlm.teacher_cache.format import compress_record

    g = torch.Generator().manual_seed(0)
    buf, per_record = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf, tarfile.open(fileobj=per_record, mode="w") as tr:
        for s in range(samples):
            ranks = torch.randperm(v, generator=g)[: 4 * k].float() + 1  # the head's ids; the rest are tail
            logits = torch.full((tokens, v), -30.0)
            head_ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(tokens)])
            logits.scatter_(1, head_ids, -2.0 * torch.log(ranks[:k]).expand(tokens, k) + 0.3 * torch.randn(tokens, k, generator=g))
            logp = torch.log_softmax(logits, -1)
            values, ids = logp.topk(k, -1)
            tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1)
            rec = encode(np.zeros(tokens, dtype=np.int32), ids.int().numpy(), values.numpy(), tail.numpy())
            for out, data in ((tf, rec), (tr, compress_record(rec))):
                info = tarfile.TarInfo(f"s{s:05d}.topk")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    n = samples * tokens
    return len(raw) / n, len(gzip.compress(raw, compresslevel=1)) / n, len(per_record.getvalue()) / n


def throughput(out: Path, steps: int, extra) -> float:
    if out.exists():
        import shutil

        shutil.rmtree(out)
    sh([str(Path(PY).parent / "taid-vlm"), "train", "configs/tiny_text.yaml", "--output-dir", str(out),
        f"train.total_steps={steps}", "train.progress_bar=false", "train.tensorboard=false", "train.eval_batches=1",
        *extra])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][3:]
    return statistics.median(tps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("/tmp/cache_bench"))
    ap.add_argument("--fidelity-tokens", type=int, default=4, help="tokens per fidelity measurement (V = 151,936)")
    ap.add_argument("--e2e-steps", type=int, default=0, help="student steps of the end-to-end runs (0: skip them)")
    ap.add_argument("--teacher-steps", type=int, default=300, help="CE steps of the end-to-end bed's teacher")
    ap.add_argument("--e2e-losses", default="taid,rkl", help="losses of the end-to-end runs, comma-separated")
    ap.add_argument("--text-bed", type=Path, help="a checkout with the real-text bed and its trained teachers "
                    "(data/text_bed, runs/text_bed/gap/teachers/{s,l}/model): fidelity on its teacher too")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in (64, 512):
        for compress in (True, False):
            m = cache(a.out / f"k{k}_{'gz' if compress else 'tar'}", k, compress)
            t = m["totals"]
            rows.append((f"tiny_text V=512 k={k} {'gzip' if compress else 'tar'}", t["payload_bytes_per_supervised_token"],
                         t["bytes_per_supervised_token"], t["supervised_tokens"] / max(t["cached"], 1)))
    plain, gz, gz_records = zipf_records()
    rows.append(("Zipf teacher V=151936 k=64 tar", 392 + 16 / 40, plain, 40))
    rows.append(("Zipf teacher V=151936 k=64 gzip", 392 + 16 / 40, gz, 40))
    rows.append(("Zipf teacher V=151936 k=64 gzip records", 392 + 16 / 40, gz_records, 40))
    print(f"{'storage':40s} {'payload B/tok':>13s} {'disk B/tok':>11s} {'tok/sample':>10s}")
    for name, payload, disk, per in rows:
        print(f"{name:40s} {payload:13.1f} {disk:11.1f} {per:10.1f}")
    online = throughput(a.out / "run_online", a.steps, [])
    # the training run evaluates at the end: cache the val split too
    cdir = a.out / "k64_both"
    if not (cdir / "manifest.json").exists():
        sh([PY, "-m", "data_tools.cache_teacher", "configs/tiny_text.yaml", "--k", "64", "--out", str(cdir)])
    cached = throughput(a.out / "run_cached", a.steps, ["teacher.model=null", f"teacher.cache={cdir}"])
    print(f"\n{'training (tiny_text, fp32, CPU)':40s} {'tokens/s':>10s}")
    print(f"{'online teacher':40s} {online:10.0f}")
    print(f"{'cached teacher (k=64)':40s} {cached:10.0f}   ({cached / online:.2f}x)")
    from cache_fidelity import fidelity_tables, train_time_cost

    fidelity_tables(a.fidelity_tokens)
    train_time_cost(8 * a.fidelity_tokens)
    if a.text_bed is not None:
        from cache_fidelity import text_bed_tables

        text_bed_tables(a.text_bed, 512)
    if a.e2e_steps > 0:
        from cache_e2e import end_to_end

        end_to_end(a.out / "e2e", a.e2e_steps, a.teacher_steps, a.e2e_losses.split(","), PY, sh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
