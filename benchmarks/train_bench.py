"""Training throughput of the distillation step: tokens/s, and model FLOPs utilisation on a GPU.

    .venv/bin/python benchmarks/train_bench.py                          # CPU: tiny VLM and text recipes
    python benchmarks/train_bench.py --gpu                              # GPU: Qwen2-1.5B student, Qwen2-7B teacher
                                                                        # (random weights, bf16, packed seq 2048)
Runs the real trainer (`python -m taid_vlm.train`, what `taid-vlm train` runs) in a subprocess per setting,
its output passed through, and reads metrics.jsonl; the first `--warmup` steps are left out of the median.
`--gpu --smoke` runs the GPU recipe with tiny Qwen2 shapes (real vocabularies) on whatever device is there,
to check the script end to end on a CPU. MFU counts student forward+backward (6 N per token) and
teacher forward (2 N per token) plus attention (PaLM's 12 L H T / 4 L H T per token), over the
accelerator's dense bf16 peak (--peak-tflops, 989 for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]

QWEN2_1P5B = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                  tie_word_embeddings=True)
QWEN2_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096,
                tie_word_embeddings=False)


SMOKE_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)


def params_of(c: dict) -> int:
    """Parameters of a Qwen2 decoder (embedding + layers + lm_head), from its config."""
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = h * h * 2 + 2 * h * kv + (h + 2 * kv) + 3 * h * i + 2 * h
    emb = c["vocab_size"] * h
    return emb * (1 if c["tie_word_embeddings"] else 2) + L * per_layer + h


def flops_per_token(student: dict, teacher: dict, seq: int) -> float:
    def attn(c):
        return c["num_hidden_layers"] * c["hidden_size"] * seq
    return 6 * params_of(student) + 12 * attn(student) + 2 * params_of(teacher) + 4 * attn(teacher)


def logged_steps(metrics: Path) -> list[dict]:
    """The per-step records of metrics.jsonl so far (a line still being written is left out)."""
    if not metrics.exists():
        return []
    lines = metrics.read_text().split("\n")[:-1]  # the part after the last newline may be incomplete
    return [json.loads(x) for x in lines if '"loss"' in x]


def run(config: Path, out: Path, steps: int, extra: list[str], launcher: list[str],
        timeout_s: Optional[float] = None, stop_when_logged: bool = False) -> list[dict]:
    """The trainer's per-step records. With `stop_when_logged` the trainer is killed once all steps are
    logged (a big model's final checkpoint takes longer than the steps); past `timeout_s` it is killed
    and the steps logged so far count."""
    cmd = [*launcher, str(config), "--output-dir", str(out), f"train.total_steps={steps}",
           "train.progress_bar=false", "train.tensorboard=false", "train.save_every=0", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sys.stdout.flush()
    proc = subprocess.Popen(cmd, env=env)  # output passed through: a slow or stuck step shows where it is
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stopped = None
    while proc.poll() is None and stopped is None:
        if stop_when_logged and len(logged_steps(out / "metrics.jsonl")) >= steps:
            stopped = "all steps logged"
        elif deadline is not None and time.monotonic() > deadline:
            stopped = f"--trainer-timeout {timeout_s:.0f} s passed"
        else:
            time.sleep(0.5)
    if stopped:
        proc.kill()  # SIGKILL: SIGTERM would make the trainer write its checkpoint first
        print(f"train_bench: trainer stopped ({stopped})", flush=True)
    status = proc.wait()
    records = logged_steps(out / "metrics.jsonl")
    if (status != 0 and not stopped) or not records:
        raise SystemExit(f"{' '.join(cmd)} failed (exit status {status}, {len(records)} steps logged)")
    return records


def write_long_documents(out: Path, n: int, min_words: int) -> None:
    """Text-only conversations whose answer alone has >= min_words words (>= as many tokens): each fills a
    max_length row, so the step processes micro_batch x seq tokens (short samples would measure overheads)."""
    import random

    from taid_vlm.data.shard_writer import write_shards
    from taid_vlm.data.synthetic import caption, random_scene

    rng = random.Random(0)

    def record(i):
        words: list[str] = []
        while len(words) < min_words:
            words += caption(random_scene(rng)).split()
        messages = [{"role": "user", "content": "Describe many scenes."},
                    {"role": "assistant", "content": " ".join(words)}]
        return f"doc{i:07d}", [], {"json": {"messages": messages}}

    write_shards((record(i) for i in range(n)), out, "shard", maxcount=100)


def gpu_recipe(args, tmp: Path, launcher: list[str]) -> tuple:
    """Qwen2-1.5B student <- Qwen2-7B teacher (random weights, bf16, packed text): (name, tokens/s, MFU)."""
    from taid_vlm.tokenizer import build_tiny_tokenizer

    tok_dir = tmp / "tok"
    build_tiny_tokenizer(save_dir=tok_dir)
    model = lambda c: {"type": "causal_lm", "dtype": "bfloat16", "tokenizer": {"path": str(tok_dir)},  # noqa: E731
                       "llm": {"config": c, "attn_implementation": "sdpa", "gradient_checkpointing": True}}
    student, teacher = ({**c, **SMOKE_SHAPES} if args.smoke else c for c in (QWEN2_1P5B, QWEN2_7B))
    cfg = {
        "teacher": {"model": model(teacher)}, "student": {"model": model(student)},
        "data": {"train": str(tmp / "text/train"), "text_only": True, "pack": True, "max_length": args.seq},
        "loss": {"name": "taid", "chunk_size": 2048},
        "optim": {"lr": 1e-5}, "deepspeed": {"zero_stage": 2},
        "train": {"micro_batch_size": args.micro_batch, "precision": "bf16"},
    }
    # Enough documents for every step (the first run measured ~40-token samples: 437 tokens/s, MFU 1.2 %).
    write_long_documents(tmp / "text/train", args.micro_batch * (args.steps + 2), min_words=args.seq)
    config = tmp / "gpu.yaml"
    config.write_text(yaml.safe_dump(cfg))
    recs = run(config, tmp / "gpu", args.steps, [], launcher, args.trainer_timeout, stop_when_logged=True)
    if len(recs) <= args.warmup:
        raise SystemExit(f"train_bench: only {len(recs)} steps logged, none after the {args.warmup} warm-up steps")
    tps = statistics.median(r["tokens_per_s"] for r in recs[args.warmup:])
    mfu = tps * flops_per_token(student, teacher, args.seq) / (args.peak_tflops * 1e12)
    name = "smoke (tiny shapes)" if args.smoke else "qwen2-1.5B <- 7B"
    print(f"train_bench: {len(recs)} steps logged; tokens/s per step: "
          + " ".join(f"{r['tokens_per_s']:.0f}" for r in recs), flush=True)
    return (f"{name}, bf16, seq {args.seq}, mb {args.micro_batch}", tps, mfu)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="Qwen2-1.5B student / Qwen2-7B teacher shapes, bf16")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--smoke", action="store_true", help="with --gpu: tiny shapes, to check the script on a CPU")
    ap.add_argument("--trainer-timeout", type=float, help="with --gpu: stop the trainer after this many seconds "
                    "and use the steps it logged so far")
    args = ap.parse_args()
    launcher = [sys.executable, "-m", "taid_vlm.train"]  # works without the console script installed
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.gpu:
            settings = [("tiny_vlm", REPO / "configs/tiny_vlm.yaml", []),
                        ("tiny_text", REPO / "configs/tiny_text.yaml", []),
                        ("tiny_text packed", REPO / "configs/tiny_text.yaml", ["data.pack=true"])]
            for name, config, extra in settings:
                recs = run(config, tmp / name.replace(" ", "_"), args.steps, extra, launcher)
                tps = statistics.median(r["tokens_per_s"] for r in recs[args.warmup:])
                rows.append((name, tps, None))
        else:
            rows.append(gpu_recipe(args, tmp, launcher))
    print(f"{'setting':<44} {'tokens/s':>10} {'MFU':>7}")
    for name, tps, mfu in rows:
        print(f"{name:<44} {tps:>10.0f} {'' if mfu is None else f'{100 * mfu:6.1f}%':>7}")


if __name__ == "__main__":
    main()
