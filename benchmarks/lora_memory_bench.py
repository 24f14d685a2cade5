"""Peak memory of a LoRA student against full fine-tuning of the same student, same run otherwise.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lora_memory_bench.py [--hidden 1024 --layers 8 --steps 3]

Each mode trains in a fresh process: configs/tiny_text.yaml (TAID, the tiny teacher, synthetic text
shards), its student widened to a Qwen2 of --hidden x --layers, micro-batch 4, max_length 256, fp32,
ZeRO-0, AdamW. Printed: parameters, trainable parameters, peak RSS of the process (ru_maxrss: weights,
gradients, optimizer state, activations and the framework's own), the peak of CUDA allocations when
on a GPU, and seconds per step. Full fine-tuning holds a gradient and two AdamW moments (12 bytes in
fp32) for each parameter; LoRA holds them for the adapters only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time, torch
from taid_vlm.config import load_config
from taid_vlm.train.trainer import Trainer
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
run = Trainer(cfg).setup().resume()
run.train_step()  # warm-up (first-call allocations), not timed
start = time.time()
for _ in range(cfg.train.total_steps - 1):
    run.train_step()
params = list(run.student_model.parameters())
print("RESULT", json.dumps({
    "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad),
    "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "cuda_peak_MiB": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
    "s_per_step": round((time.time() - start) / max(cfg.train.total_steps - 1, 1), 2)}))
"""


def run_mode(lora: bool, a, out: Path) -> dict:
    overrides = [f"output_dir={out / ('lora' if lora else 'full')}", f"data.synthetic_dir={out / 'data'}",
                 f"data.train={out / 'data' / 'train'}", f"data.val={out / 'data' / 'val'}",
                 f"train.total_steps={a.steps}", "train.progress_bar=false", "train.report_to=none",
                 "train.save_every=0", "train.eval_batches=1", "train.overwrite=true",
                 f"student.model.llm.config.hidden_size={a.hidden}", f"student.model.llm.config.num_hidden_layers={a.layers}",
                 f"student.model.llm.config.intermediate_size={a.hidden * 11 // 4}",
                 f"student.model.llm.config.num_attention_heads={a.hidden // 64}",
                 f"student.model.llm.config.num_key_value_heads={max(a.hidden // 256, 1)}"]
    if lora:
        overrides.append(f"student.model.lora={{r: {a.r}, alpha: {2 * a.r}, target_modules: all-linear}}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "configs" / "tiny_text.yaml"), json.dumps(overrides)],
                          env=env, capture_output=True, text=True, timeout=7200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{'lora' if lora else 'full'} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lora_memory_bench")
    a = ap.parse_args()
    rows = {mode: run_mode(mode == "lora", a, a.out.resolve()) for mode in ("full", "lora")}
    print(f"student: Qwen2 hidden {a.hidden} x {a.layers} layers; LoRA r {a.r} on all linear layers; {a.steps} steps")
    print("| mode | parameters | trainable | peak RSS MiB | CUDA peak MiB | s / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        cuda = "-" if r["cuda_peak_MiB"] is None else f"{r['cuda_peak_MiB']:,.0f}"
        print(f"| {mode} | {r['params']:,} | {r['trainable']:,} | {r['peak_rss_MiB']:,.0f} | {cuda} | {r['s_per_step']} |")
    full, lora = rows["full"], rows["lora"]
    print(f"LoRA / full peak RSS: {100 * lora['peak_rss_MiB'] / full['peak_rss_MiB']:.1f} %"
          + (f"; CUDA: {100 * lora['cuda_peak_MiB'] / full['cuda_peak_MiB']:.1f} %" if full["cuda_peak_MiB"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
