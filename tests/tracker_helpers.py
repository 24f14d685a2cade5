"""Read back what the experiment trackers wrote, each with its own tools: W&B's transaction log through
`wandb leet inspect --json`, MLflow through MlflowClient against a tracking server on 127.0.0.1 that
the fixture starts and stops, TensorBoard's event files through its EventAccumulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from taid_vlm.train.launch_env import free_port

BIN = Path(sys.executable).parent
SERVER_START_TRIES = 600  # 0.5 s apart: a hang guard for a loaded machine, never a speed limit


def wandb_runs(wandb_dir: Path) -> list[list[dict]]:
    """The records of each local W&B run under `wandb_dir` (oldest first), read by wandb's own reader."""
    runs = []
    for run_dir in sorted(Path(wandb_dir).glob("*run-*")):
        out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, check=True).stdout
        runs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    return runs


def wandb_history(records: list[dict]) -> dict[int, dict]:
    """Our step -> the metrics W&B recorded for it (a step's train and eval records together)."""
    steps: dict[int, dict] = {}
    for item in (r["history"]["item"] for r in records if r["type"] == "history"):
        steps.setdefault(int(item["step"]), {}).update(item)
    return steps


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


class MlflowServer:
    """`mlflow server` on 127.0.0.1 only (a SQLite store and an artifact folder under `root`), stopped by `stop`."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(root) / "mlflow-server.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{Path(root) / 'mlflow.db'}",
             "--artifacts-destination", str(Path(root) / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ})
        self._wait_ready(root)

    def _wait_ready(self, root: Path) -> None:
        for _ in range(SERVER_START_TRIES):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}): "
                                   f"{(Path(root) / 'mlflow-server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not answer /health")

    def stop(self) -> None:
        """The server and its uvicorn worker: the process group this fixture started."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
