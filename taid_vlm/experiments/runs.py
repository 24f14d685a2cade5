"""Launch `taid-vlm train` / `taid-vlm export` as subprocesses, show their progress, read what they wrote.

Each training run is its own process (the trainer initialises torch.distributed and DeepSpeed, which a
process can do once), with one BLAS thread unless the caller set OMP_NUM_THREADS. Its stdout/stderr
go to RUN_DIR/train.log; progress is read from RUN_DIR/metrics.jsonl and printed as one line every few
seconds. RUN_DIR/experiment.json records the exact command: a finished run (an `end` event in its
metrics) with the same command is reused instead of retrained, unless `fresh`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

STAMP = "experiment.json"


class RunFailed(RuntimeError):
    """A training or export subprocess exited with an error; the message holds the tail of its log."""


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # two BLAS threads per process thrash a 2-core machine
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sigterm_as_interrupt() -> None:
    """Turn SIGTERM into KeyboardInterrupt so a killed demo/compare also stops its training subprocess."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def read_records(run_dir: Path) -> list[dict]:
    """Every JSON record of RUN_DIR/metrics.jsonl (a half-written last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass
class Metrics:
    """One run's metrics: training steps and evaluations, each keyed by step (the last record wins)."""

    train: dict[int, dict] = field(default_factory=dict)
    evals: dict[int, dict] = field(default_factory=dict)
    finished: bool = False

    @classmethod
    def read(cls, run_dir: Path) -> "Metrics":
        m = cls()
        for r in read_records(run_dir):
            if r.get("event") == "end":
                m.finished = True
            elif "event" in r:
                continue
            elif any(k.startswith("eval_") for k in r):  # a step's records merge (`taid-vlm eval --run` adds one)
                m.evals.setdefault(int(r["step"]), {}).update(r)
            elif "loss" in r and "step" in r:
                m.train[int(r["step"])] = r
        return m

    def series(self, key: str, source: str = "train") -> tuple[list[int], list[float]]:
        records = self.train if source == "train" else self.evals
        steps, values = [], []
        for s in sorted(records):
            v = records[s].get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(s)
                values.append(float(v))
        return steps, values

    @property
    def final_eval(self) -> dict:
        if not self.evals:
            return {}
        return {k: v for k, v in self.evals[max(self.evals)].items() if k.startswith("eval_")}


@dataclass
class TrainJob:
    """`taid-vlm train CONFIG --output-dir RUN_DIR --max-steps STEPS OVERRIDES...`"""

    name: str
    config: Path
    run_dir: Path
    steps: int
    overrides: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "taid_vlm.cli", "train", str(self.config), "--output-dir", str(self.run_dir),
                "--max-steps", str(self.steps), "train.progress_bar=false", "train.tensorboard=false",
                *self.overrides]

    def _stamp(self) -> dict:
        return {"argv": self.command()[3:]}  # what was run; not the display name (it holds "i/n")

    def is_done(self) -> bool:
        stamp = self.run_dir / STAMP
        if not stamp.is_file():
            return False
        try:
            same = json.loads(stamp.read_text()) == json.loads(json.dumps(self._stamp()))
        except json.JSONDecodeError:
            return False
        return same and Metrics.read(self.run_dir).finished


def _log_tail(path: Path, n: int = 40) -> str:
    if not path.is_file():
        return ""
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(name: str, metrics: Metrics, total: int, elapsed: float) -> str:
    if not metrics.train:
        return f"[{name}] starting ({_fmt_seconds(elapsed)})"
    step = max(metrics.train)
    rec = metrics.train[step]
    parts = [f"[{name}] step {step}/{total}", f"loss {rec['loss']:.4f}" if rec.get("loss") is not None else "loss nan"]
    if rec.get("t") is not None:
        parts.append(f"t {rec['t']:.3f}")
    ev = metrics.final_eval
    if "eval_student_acc" in ev:
        parts.append(f"held-out acc {ev['eval_student_acc']:.3f}")
    if "eval_kl" in ev:
        parts.append(f"held-out KL {ev['eval_kl']:.4f}")
    first = min(metrics.train)
    t0, t1 = metrics.train[first].get("time"), rec.get("time")
    eta = ""
    if t0 and t1 and step > first:
        eta = f", ~{_fmt_seconds((t1 - t0) / (step - first) * (total - step))} left"
    parts.append(f"({_fmt_seconds(elapsed)}{eta})")
    return " ".join(parts)


def run_training(job: TrainJob, fresh: bool = False, echo: Callable[[str], None] = print,
                 every_s: float = 10.0, timeout_s: Optional[float] = None) -> Metrics:
    """Train (or reuse a finished identical run); print progress; return the run's metrics."""
    if not fresh and job.is_done():
        echo(f"[{job.name}] reusing the finished run in {job.run_dir} (--fresh to retrain)")
        return Metrics.read(job.run_dir)
    if job.run_dir.exists():
        shutil.rmtree(job.run_dir)  # a stale or different run: metrics.jsonl appends, checkpoints would mix
    job.run_dir.mkdir(parents=True)
    log_path = job.run_dir / "train.log"
    echo(f"[{job.name}] {job.steps} steps -> {job.run_dir}")
    start = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(job.command()) + "\n")
        log.flush()
        proc = subprocess.Popen(job.command(), stdout=log, stderr=subprocess.STDOUT, env=child_env())
        last_print = start
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.time()
                if timeout_s is not None and now - start > timeout_s:
                    proc.kill()
                    proc.wait()
                    raise RunFailed(f"[{job.name}] timed out after {_fmt_seconds(now - start)}; log: {log_path}")
                if now - last_print >= every_s:
                    echo(progress_line(job.name, Metrics.read(job.run_dir), job.steps, now - start))
                    last_print = now
        except BaseException:
            if proc.poll() is None:  # Ctrl-C or an error here: do not leave the trainer running
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise
    metrics = Metrics.read(job.run_dir)
    if proc.returncode != 0 or not metrics.finished:
        raise RunFailed(f"[{job.name}] `taid-vlm train` failed (exit code {proc.returncode}); "
                        f"log: {log_path}\n{_log_tail(log_path)}")
    (job.run_dir / STAMP).write_text(json.dumps(job._stamp(), indent=1))
    echo(progress_line(job.name, metrics, job.steps, time.time() - start).replace(" step ", " done: step ", 1))
    return metrics


def run_export(run_dir: Path, out_dir: Path, fresh: bool = False, echo: Callable[[str], None] = print) -> Path:
    """`taid-vlm export RUN_DIR OUT_DIR` in a subprocess (reused when OUT_DIR is newer than the run)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    done = out_dir / ".exported_from"
    stamp = str((run_dir / STAMP).stat().st_mtime) if (run_dir / STAMP).is_file() else None
    if not fresh and stamp and done.is_file() and done.read_text() == stamp:
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cmd = [sys.executable, "-m", "taid_vlm.cli", "export", str(run_dir), str(out_dir)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunFailed(f"`taid-vlm export {run_dir} {out_dir}` failed ({proc.returncode}):\n"
                        f"{(proc.stdout + proc.stderr)[-4000:]}")
    if stamp:
        done.write_text(stamp)
    echo(f"exported {run_dir.name} -> {out_dir}")
    return out_dir


def count_parameters(model_dir_or_cfg) -> dict[str, int]:
    """Parameter counts of a model (a saved folder or a model config dict), total and per component."""
    import torch

    from taid_vlm.models import build_model, load_model

    with torch.device("meta") if isinstance(model_dir_or_cfg, dict) else contextlib.nullcontext():
        if isinstance(model_dir_or_cfg, dict):
            model = build_model(model_dir_or_cfg, role="student")
        elif not (Path(model_dir_or_cfg) / "taid_model.json").is_file():  # a text-only export: a plain HF causal LM
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_dir_or_cfg))
        else:
            model = load_model(model_dir_or_cfg, role="teacher")
    seen, counts = set(), {"total": 0}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = name.split(".")[0]
        counts[part] = counts.get(part, 0) + p.numel()
        counts["total"] += p.numel()
    return counts


def overrides_text(overrides: Sequence[str]) -> str:
    return " ".join(f"'{o}'" if any(c in o for c in " {}[],:") else o for o in overrides)
