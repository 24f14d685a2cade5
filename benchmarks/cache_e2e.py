"""A student trained from each teacher-cache format vs one trained with the online teacher: same config,
seed, steps and data order; every student then evaluated against the ONLINE teacher on the held-out
split (KL(p_T || q_S) per supervised token, top-1 agreement, student CE). Used by cache_bench.py.

Two beds:
- tiny: the tiny text recipe (configs/tiny_text.yaml, V = 512, synthetic scene descriptions with Q/A),
  with its teacher first TRAINED with cross-entropy (``--teacher-steps``; the recipe's own teacher has
  random weights, whose flat distributions are not what a cache is for), exported and used as the
  teacher of every run;
- text bed: configs/text_bed/distill.yaml with the bed's teacher m (docs/results.md builds both), its
  training split cut to the first shard (1,916 samples, more than 100 steps x 8 read) so that the cache
  is written for what training reads, in minutes instead of the whole 5.6 M-token split.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

FORMATS = {  # name -> cache_teacher arguments (None: the online teacher)
    "online": None,
    "hidden fp32 (exact)": ["--format", "hidden"],
    "top-64, uniform tail": ["--k", "64"],
    "top-64, student tail": ["--k", "64", "--tail", "student"],
}
LOSS_PARAMS = {"taid": "loss.params={t_start: 0.4, t_end: 1.0, alpha: 5.0e-4, beta: 0.99}", "rkl": "loss.params={}"}


def causal_lm_spec(folder: Path, tokenizer: dict) -> dict:
    """The model config of an exported Hugging Face causal-LM folder (teacher or student)."""
    return {"type": "causal_lm", "dtype": "float32", "tokenizer": tokenizer,
            "llm": {"path": str(folder), "attn_implementation": "sdpa"}}


def write_spec(path: Path, spec: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


@dataclass
class Bed:
    name: str
    config: str                      # the training recipe of every run
    teacher: Path                    # the online teacher's model yaml
    tokenizer: dict                  # how an exported student folder's tokenizer loads
    overrides: List[str] = field(default_factory=list)  # applied to cache writing, training and evaluation


def tiny_bed(out: Path, teacher_steps: int, taid_vlm: str, sh: Callable) -> Bed:
    return Bed("tiny_text", "configs/tiny_text.yaml", _train_teacher(out, teacher_steps, taid_vlm, sh), {"builtin": "tiny"})


def text_bed(out: Path, checkout: Path, teacher: str = "m") -> Bed:
    """The real-text bed of ``checkout`` (data/text_bed and runs/text_bed/gap/teachers/NAME/model built there)."""
    checkout = checkout.resolve()
    model, tokenizer = checkout / f"runs/text_bed/gap/teachers/{teacher}/model", checkout / "data/text_bed/tokenizer"
    for needed in (model, tokenizer):
        if not needed.is_dir():
            raise SystemExit(f"{needed} does not exist: build the text bed and its teachers first (docs/results.md)")
    out.mkdir(parents=True, exist_ok=True)
    spec = write_spec(out / f"text_bed_teacher_{teacher}.yaml", causal_lm_spec(model, {"path": str(model)}))
    data = checkout / "data/text_bed"
    return Bed(f"text bed, teacher {teacher}", "configs/text_bed/distill.yaml", spec, {"path": str(tokenizer)},
               [f"data.train={data}/train/text-000000.tar", f"data.val={data}/val"])


def _train_teacher(out: Path, steps: int, taid_vlm: str, sh: Callable) -> Path:
    """The recipe's teacher trained with CE in the student slot, exported; returns its model yaml."""
    model = out / "teacher_model"
    if not (model / "config.json").exists():
        run = out / "teacher_run"
        shutil.rmtree(run, ignore_errors=True)
        sh([taid_vlm, "train", "configs/tiny_text.yaml", "--output-dir", str(run),
            "student.model=configs/models/tiny_text_teacher.yaml", "teacher.model=null", "loss.name=ce",
            "loss.params={}", f"train.total_steps={steps}", "train.micro_batch_size=8", "optim.lr=3e-3",
            "train.progress_bar=false", "train.tensorboard=false", "train.save_every=0"])
        sh([taid_vlm, "export", str(run), str(model)])
    return write_spec(out / "teacher.yaml", causal_lm_spec(model, {"builtin": "tiny"}))


def held_out_metrics(student_dir: Path, bed: Bed) -> Dict[str, float]:
    """The exported student against the bed's online teacher on its recipe's val split."""
    import torch

    from taid_vlm.config import load_config
    from taid_vlm.data import build_loader
    from taid_vlm.losses import OnlineTeacher
    from taid_vlm.train.components import build_role_model
    from taid_vlm.train.preflight import shard_lists
    from taid_vlm.train.evaluate import METRICS, metric_sums
    from taid_vlm.train.objective import hidden_at
    from taid_vlm.train.synthetic import ensure_synthetic_data

    cfg = load_config(bed.config, bed.overrides)
    ensure_synthetic_data(cfg, 0)  # tiny_text's held-out split, in a fresh checkout too (the docs test runs there)
    import yaml

    student = build_role_model(causal_lm_spec(student_dir, bed.tokenizer), "student").eval()
    teacher = build_role_model(yaml.safe_load(bed.teacher.read_text()), "teacher").eval()
    v = len(student.tokenizer)
    loader = build_loader(shard_lists(cfg, ("val",))["val"], student.input_spec, teacher.input_spec, mode="eval",
                          batch_size=8, max_length=cfg.data.max_length, num_workers=0, text_only=True)
    sums, n = dict.fromkeys(METRICS, 0.0), 0
    with torch.no_grad():
        for b in loader:
            source = OnlineTeacher(hidden_at(teacher, b["teacher"]), teacher.output_weight()[:v])
            part = metric_sums(hidden_at(student, b["student"]), student.output_weight()[:v], source,
                               b["student"]["loss_targets"])
            sums = {k: sums[k] + part[k] for k in METRICS}
            n += int(b["student"]["loss_targets"].numel())
    return {**{k: sums[k] / n for k in METRICS}, "tokens": n}


def end_to_end(out: Path, steps: int, teacher_steps: int, losses: List[str], py: str, sh: Callable,
               checkout: Path = None):
    """{(loss, format): held-out metrics}; prints one table per loss with the ratio to online. On the tiny
    bed, or with ``checkout`` on the real-text bed built there."""
    taid_vlm = str(Path(py).parent / "taid-vlm")
    out.mkdir(parents=True, exist_ok=True)
    bed = tiny_bed(out, teacher_steps, taid_vlm, sh) if checkout is None else text_bed(out, checkout)
    teacher = bed.teacher
    results = {}
    for loss in losses:
        for name, args in FORMATS.items():
            tag = name.split(",")[0].split(" ")[0] + ("" if "," not in name else "_" + name.split(", ")[1].split()[0])
            run, model = out / f"{loss}_{tag}", out / f"{loss}_{tag}_student"
            extra = [f"teacher.model={teacher}"]
            if args is not None:
                cache = out / f"cache_{tag}"
                if not (cache / "manifest.json").exists():
                    sh([py, "-m", "data_tools.cache_teacher", bed.config, *args, "--out", str(cache),
                        f"teacher.model={teacher}", *bed.overrides])
                extra.append(f"teacher.cache={cache}")
            for p in (run, model):
                shutil.rmtree(p, ignore_errors=True)
            sh([taid_vlm, "train", bed.config, "--output-dir", str(run), *bed.overrides, *extra, f"loss.name={loss}",
                LOSS_PARAMS[loss], f"train.total_steps={steps}", "seed=0", "train.progress_bar=false",
                "train.tensorboard=false", "train.save_every=0"])
            sh([taid_vlm, "export", str(run), str(model)])
            results[loss, name] = {**held_out_metrics(model, bed), "tokens_per_s": _median_speed(run)}
    _print(results, losses, steps, bed.name)
    (out / "e2e.json").write_text(json.dumps({f"{k[0]}|{k[1]}": v for k, v in results.items()}, indent=1))
    return results


def _median_speed(run: Path) -> float:
    import statistics

    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][3:]
    return statistics.median(speeds) if speeds else float("nan")


def _print(results, losses, steps, bed: str) -> None:
    print(f"\nend to end ({bed} bed, trained teacher, {steps} steps, seed 0; held-out, vs the online teacher)")
    print(f"{'loss':5s} {'teacher':24s} {'KL(T||S)':>9s} {'vs online':>10s} {'top-1 agr':>9s} {'student CE':>10s} "
          f"{'tokens/s':>9s}")
    for loss in losses:
        base = results[loss, "online"]["kl"]
        for name in FORMATS:
            r = results[loss, name]
            print(f"{loss:5s} {name:24s} {r['kl']:9.4f} {r['kl'] / base - 1:+10.2%} {r['top1_agreement']:9.3f} "
                  f"{r['student_ce']:10.4f} {r['tokens_per_s']:9.0f}")


def run_quietly(env, cwd):
    def sh(cmd):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(cwd))
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return proc
    return sh


def main() -> int:
    """The end-to-end part alone: ``python benchmarks/cache_e2e.py --text-bed . --steps 100`` (real-text
    bed) or ``--steps 150 --teacher-steps 300`` (tiny bed)."""
    import argparse
    import os
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="student steps of every run")
    ap.add_argument("--teacher-steps", type=int, default=300, help="tiny bed: CE steps of its teacher")
    ap.add_argument("--text-bed", type=Path, help="a checkout with the real-text bed and teacher m built (else the tiny bed)")
    ap.add_argument("--losses", default="taid,rkl")
    ap.add_argument("--out", type=Path, default=Path("/tmp/cache_e2e"))
    a = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    end_to_end(a.out, a.steps, a.teacher_steps, a.losses.split(","), sys.executable, run_quietly(env, repo),
               checkout=a.text_bed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
