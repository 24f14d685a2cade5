"""Training throughput of the distillation step: tokens/s, and model FLOPs utilisation on a GPU.

    .venv/bin/python benchmarks/train_bench.py                          # CPU: tiny VLM and text recipes
    python benchmarks/train_bench.py --gpu                              # GPU: Qwen2-1.5B student, Qwen2-7B teacher
                                                                        # (random weights, bf16, packed seq 2048)
Runs the real trainer (`taid-vlm train`) in a subprocess per setting and reads metrics.jsonl; the first
`--warmup` steps are left out of the median. MFU counts student forward+backward (6 N per token) and
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
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

QWEN2_1P5B = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                  tie_word_embeddings=True)
QWEN2_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096,
                tie_word_embeddings=False)


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


def run(config: Path, out: Path, steps: int, extra: list[str], launcher: list[str]) -> list[dict]:
    cmd = [*launcher, str(config), "--output-dir", str(out), f"train.total_steps={steps}",
           "train.progress_bar=false", "train.tensorboard=false", "train.save_every=0", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="Qwen2-1.5B student / Qwen2-7B teacher shapes, bf16")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    launcher = [str(Path(sys.executable).parent / "taid-vlm"), "train"]
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
            tok_dir = tmp / "tok"
            from taid_vlm.tokenizer import build_tiny_tokenizer

            build_tiny_tokenizer(save_dir=tok_dir)
            model = lambda c: {"type": "causal_lm", "dtype": "bfloat16", "tokenizer": {"path": str(tok_dir)},  # noqa: E731
                               "llm": {"config": c, "attn_implementation": "sdpa", "gradient_checkpointing": True}}
            cfg = {
                "teacher": {"model": model(QWEN2_7B)}, "student": {"model": model(QWEN2_1P5B)},
                "data": {"train": str(tmp / "text/train"), "synthetic": {"kind": "shapes_text", "n": 4000},
                         "synthetic_dir": str(tmp / "text"), "text_only": True, "pack": True, "max_length": args.seq},
                "loss": {"name": "taid", "chunk_size": 2048},
                "optim": {"lr": 1e-5}, "deepspeed": {"zero_stage": 2},
                "train": {"micro_batch_size": args.micro_batch, "precision": "bf16"},
            }
            config = tmp / "gpu.yaml"
            config.write_text(yaml.safe_dump(cfg))
            recs = run(config, tmp / "gpu", args.steps, [], launcher)
            tps = statistics.median(r["tokens_per_s"] for r in recs[args.warmup:])
            mfu = tps * flops_per_token(QWEN2_1P5B, QWEN2_7B, args.seq) / (args.peak_tflops * 1e12)
            rows.append((f"qwen2-1.5B <- 7B, bf16, seq {args.seq}, mb {args.micro_batch}", tps, mfu))
    print(f"{'setting':<44} {'tokens/s':>10} {'MFU':>7}")
    for name, tps, mfu in rows:
        print(f"{name:<44} {tps:>10.0f} {'' if mfu is None else f'{100 * mfu:6.1f}%':>7}")


if __name__ == "__main__":
    main()
