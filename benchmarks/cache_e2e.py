"""A student trained from each teacher-cache format vs one trained with the online teacher: same config,
seed, steps and data order; every student then evaluated against the ONLINE teacher on the held-out
split (KL(p_T || q_S) per supervised token, top-1 agreement, student CE). Used by cache_bench.py.

Bed: the tiny text recipe (configs/tiny_text.yaml, V = 512, synthetic scene descriptions with Q/A),
with its teacher first TRAINED with cross-entropy (``--teacher-steps``; the recipe's own teacher has
random weights, whose flat distributions are not what a cache is for), exported and used as the
teacher of every run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Dict, List

FORMATS = {  # name -> cache_teacher arguments (None: the online teacher)
    "online": None,
    "hidden fp32 (exact)": ["--format", "hidden"],
    "top-64, uniform tail": ["--k", "64"],
    "top-64, student tail": ["--k", "64", "--tail", "student"],
}
LOSS_PARAMS = {"taid": "loss.params={t_start: 0.4, t_end: 1.0, alpha: 5.0e-4, beta: 0.99}", "rkl": "loss.params={}"}


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
    spec = out / "teacher.yaml"  # the exported Hugging Face folder as a causal_lm teacher
    spec.write_text(f"type: causal_lm\ndtype: float32\ntokenizer: {{builtin: tiny}}\n"
                    f"llm: {{path: {model}, attn_implementation: sdpa}}\n")
    return spec


def held_out_metrics(student_dir: Path, teacher_yaml: Path) -> Dict[str, float]:
    """The exported student against the online teacher on configs/tiny_text.yaml's val split."""
    import torch

    from taid_vlm.config import load_config
    from taid_vlm.data import build_loader
    from taid_vlm.losses import OnlineTeacher
    from taid_vlm.train.components import build_role_model, shard_paths
    from taid_vlm.train.evaluate import METRICS, metric_sums
    from taid_vlm.train.objective import hidden_at
    from taid_vlm.train.synthetic import ensure_synthetic_data

    cfg = load_config("configs/tiny_text.yaml", [])
    ensure_synthetic_data(cfg, 0)  # its held-out split, in a fresh checkout too (the docs test runs there)
    import yaml

    def hf_model(folder):
        return {"type": "causal_lm", "dtype": "float32", "tokenizer": {"builtin": "tiny"},
                "llm": {"path": str(folder), "attn_implementation": "sdpa"}}

    student = build_role_model(hf_model(student_dir), "student").eval()
    teacher = build_role_model(yaml.safe_load(teacher_yaml.read_text()), "teacher").eval()
    v = len(student.tokenizer)
    loader = build_loader(shard_paths(cfg, cfg.data.val), student.input_spec, teacher.input_spec, mode="eval",
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


def end_to_end(out: Path, steps: int, teacher_steps: int, losses: List[str], py: str, sh: Callable):
    """{(loss, format): held-out metrics}; prints one table per loss with the ratio to online."""
    taid_vlm = str(Path(py).parent / "taid-vlm")
    out.mkdir(parents=True, exist_ok=True)
    teacher = _train_teacher(out, teacher_steps, taid_vlm, sh)
    results = {}
    for loss in losses:
        for name, args in FORMATS.items():
            tag = name.split(",")[0].split(" ")[0] + ("" if "," not in name else "_" + name.split(", ")[1].split()[0])
            run, model = out / f"{loss}_{tag}", out / f"{loss}_{tag}_student"
            extra = [f"teacher.model={teacher}"]
            if args is not None:
                cache = out / f"cache_{tag}"
                if not (cache / "manifest.json").exists():
                    sh([py, "-m", "data_tools.cache_teacher", "configs/tiny_text.yaml", *args, "--out", str(cache),
                        f"teacher.model={teacher}"])
                extra.append(f"teacher.cache={cache}")
            for p in (run, model):
                shutil.rmtree(p, ignore_errors=True)
            sh([taid_vlm, "train", "configs/tiny_text.yaml", "--output-dir", str(run), *extra, f"loss.name={loss}",
                LOSS_PARAMS[loss], f"train.total_steps={steps}", "seed=0", "train.progress_bar=false",
                "train.tensorboard=false", "train.save_every=0"])
            sh([taid_vlm, "export", str(run), str(model)])
            results[loss, name] = {**held_out_metrics(model, teacher), "tokens_per_s": _median_speed(run)}
    _print(results, losses, steps)
    (out / "e2e.json").write_text(json.dumps({f"{k[0]}|{k[1]}": v for k, v in results.items()}, indent=1))
    return results


def _median_speed(run: Path) -> float:
    import statistics

    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][3:]
    return statistics.median(speeds) if speeds else float("nan")


def _print(results, losses, steps) -> None:
    print(f"\nend to end (tiny_text bed, trained teacher, {steps} steps, seed 0; held-out, vs the online teacher)")
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
