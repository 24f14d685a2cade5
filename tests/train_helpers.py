"""Run the real CLI / deepspeed launcher in subprocesses and read what the runs wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from taid_vlm.train.launch_env import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BIN = Path(sys.executable).parent
# A hang guard, never a speed limit: a 3x oversubscribed CPU makes a 5-minute run take 15 and more.
SUBPROCESS_TIMEOUT_S = 1800


def env() -> dict:
    # One BLAS thread per process: two processes on two cores thrash otherwise.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def train_cmd(config: str, out: Path, *overrides: str, nproc: int = 1) -> list[str]:
    args = [str(CONFIGS / config), "--output-dir", str(out), "train.progress_bar=false", "train.tensorboard=false",
            *overrides]
    if nproc == 1:
        return [str(BIN / "taid-vlm"), "train", *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
            "--module", "taid_vlm.train", *args]


def run(cmd: list[str], timeout: int = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(out: Path) -> dict[int, float]:
    """step -> loss (the last record of each step wins: a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def evals(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(out) if "eval_kl" in r or "eval_student_ce" in r}


def signal_at_step(cmd: list[str], out: Path, at_step: int, signum: int, group: bool = False) -> subprocess.CompletedProcess:
    """Start a run, send `signum` once it has logged `at_step` (to the run's whole process group, as a
    terminal's Ctrl-C, `timeout` or a cluster scheduler do, when `group`), return the finished process."""
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: nobody reads a pipe while we wait
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                start_new_session=group)
        try:
            while True:
                if (out / "metrics.jsonl").exists() and max(step_losses(out), default=0) >= at_step:
                    break
                if proc.poll() is not None:
                    raise AssertionError(f"the run ended before step {at_step}: {log.read_text()[-3000:]}")
                time.sleep(0.02)
            if group:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
            proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, "", log.read_text())


def one_engine_script(body: str, arg_name: str, features: int, zero_stage: int) -> str:
    """Source of a subprocess script: one real DeepSpeed engine over Linear(features, features) with
    `train_step()` and `weights()`, `root` and `<arg_name>` from argv, then `body` (the checkpoint tests)."""
    prologue = f"""
import errno, json, os, shutil, signal, sys
import torch, deepspeed
from taid_vlm.train import checkpoint as ckpt
from taid_vlm.train.launch_env import init_distributed

root, {arg_name} = sys.argv[1], sys.argv[2]
rank, world, device = init_distributed()
torch.manual_seed(0)
model = torch.nn.Linear({features}, {features})
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={{
    "train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": {zero_stage}}}}})

def train_step():
    loss = engine(torch.ones(1, {features})).pow(2).sum()
    engine.backward(loss)
    engine.step()

def weights():
    return [float(p.detach().double().sum()) for p in engine.module.parameters()]
"""
    return prologue + textwrap.dedent(body)
