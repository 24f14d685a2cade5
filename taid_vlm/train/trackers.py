"""Experiment trackers named by `train.report_to` (the Hugging Face convention): tensorboard, wandb, mlflow.

Rank 0 only. Each tracker gets every numeric metric of metrics.jsonl with its step, the resolved
config at the start, and the run's small artefacts (config.yaml, metrics.jsonl) at the end. The
tracker run ids are kept in OUTPUT_DIR/trackers.json, so a resumed run continues the same W&B and
MLflow run (and TensorBoard appends to the same folder). W&B runs where wandb says (WANDB_MODE=offline:
a local run under OUTPUT_DIR/wandb); MLflow logs to `train.mlflow_tracking_uri`, else
MLFLOW_TRACKING_URI, else a SQLite store in the run folder (OUTPUT_DIR/mlflow.db).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from taid_vlm.config import RunConfig

log = logging.getLogger("taid_vlm.train")

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"  # {"wandb": run id, "mlflow": {"run_id", "tracking_uri"}} of this run folder
ARTEFACTS = ("config.yaml", "metrics.jsonl")
MLFLOW_PARAM_BATCH = 100  # MLflow takes at most 100 params per log_batch call
MLFLOW_PARAM_CHARS = 6000  # and a param value of at most 6000 characters


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record (a dict value one level down as `key/sub`); step and time left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "time"):
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[key] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """`{"optim": {"lr": 1e-4}}` -> `{"optim.lr": "0.0001"}` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, name + "."))
        else:
            out[name] = str(value)[:MLFLOW_PARAM_CHARS]
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, writer, folder: Path):
        self.writer, self.where = writer, str(folder)

    @classmethod
    def open(cls, out_dir: Path, config: dict) -> Optional["TensorBoardTracker"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # said once, at the start, instead of a tensorboard/ folder that never appears
            log.warning("train.report_to: tensorboard is not installed, so no tensorboard/ folder is written "
                        "(pip install tensorboard, or leave tensorboard out of train.report_to)")
            return None
        folder = Path(out_dir) / "tensorboard"
        writer = SummaryWriter(str(folder))
        writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        return cls(writer, folder)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, artefacts: list[Path]) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run):
        self.run = run
        self.where = f"run {run.id} ({run.settings.mode}, {run.dir})"

    @classmethod
    def open(cls, out_dir: Path, config: dict, ids: dict, run_name: str, project: str) -> "WandbTracker":
        import wandb

        run_id = ids.get("wandb")
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, dir=str(out_dir),
                         id=run_id, resume="allow" if run_id else None, config=config,
                         settings=wandb.Settings(console="off", silent=True))
        if run_id:  # the resumed run's config may change optim.* and train.total_steps: W&B shows the current one
            run.config.update(config, allow_val_change=True)
        # Our step, not W&B's own counter: a run resumed from an earlier checkpoint logs steps again.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        ids["wandb"] = run.id
        return cls(run)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def close(self, artefacts: list[Path]) -> None:
        for path in artefacts:  # what lies in the run's files folder is uploaded when it finishes (or syncs)
            shutil.copy2(path, Path(self.run.dir) / path.name)
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, client, run_id: str, uri: str):
        self.client, self.run_id = client, run_id
        self.where = f"run {run_id} at {uri}"

    @classmethod
    def open(cls, out_dir: Path, config: dict, ids: dict, run_name: str, project: str,
             uri: Optional[str]) -> "MlflowTracker":
        from mlflow import MlflowClient

        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        in_run_folder = uri is None  # a store of the run folder keeps its artefacts there too
        if in_run_folder:
            uri = f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        known = ids.get("mlflow") or {}
        if known.get("run_id") and known.get("tracking_uri") == uri:
            client.update_run(known["run_id"], status="RUNNING")
            return cls(client, known["run_id"], uri)
        experiment = client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            project, artifact_location=(Path(out_dir).resolve() / "mlartifacts").as_uri() if in_run_folder else None)
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        _log_params(client, run_id, flat_config(config))
        ids["mlflow"] = {"run_id": run_id, "tracking_uri": uri}
        return cls(client, run_id, uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, artefacts: list[Path]) -> None:
        for path in artefacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), MLFLOW_PARAM_BATCH):
        client.log_batch(run_id, params=items[start:start + MLFLOW_PARAM_BATCH])


class Trackers:
    """The trackers of one run (rank 0): `log` each metrics record, `close` with the run's artefacts."""

    def __init__(self, out_dir: Path, trackers: list):
        self.out_dir, self.trackers = Path(out_dir), trackers

    def log(self, record: dict[str, Any]) -> None:
        if "step" not in record or "event" in record:  # resume / stopped / end markers are not metrics
            return
        metrics = numeric_metrics(record)
        for tracker in self.trackers:
            tracker.log(metrics, int(record["step"]))

    def close(self) -> None:
        artefacts = [self.out_dir / name for name in ARTEFACTS if (self.out_dir / name).is_file()]
        for tracker in self.trackers:
            tracker.close(artefacts)
        self.trackers = []


def open_trackers(cfg: RunConfig, out_dir: Path, resumed: bool) -> Trackers:
    """Open the trackers of `train.report_to` (less tensorboard when train.tensorboard is false). A resumed
    run reopens the tracker runs of trackers.json; a new run starts new ones and records their ids there."""
    t = cfg.train
    report_to = [n for n in t.report_to if n != "tensorboard" or t.tensorboard]
    config, project = cfg.to_dict(), t.tracker_project
    out_dir = Path(out_dir)
    ids_path = out_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if resumed and ids_path.is_file() else {}
    run_name = t.run_name or out_dir.resolve().name
    opened = []
    for name in report_to:
        if name == "tensorboard":
            opened.append(TensorBoardTracker.open(out_dir, config))
        elif name == "wandb":
            opened.append(WandbTracker.open(out_dir, config, ids, run_name, project))
        elif name == "mlflow":
            opened.append(MlflowTracker.open(out_dir, config, ids, run_name, project, t.mlflow_tracking_uri))
    opened = [tracker for tracker in opened if tracker is not None]
    if any(tracker.name != "tensorboard" for tracker in opened):
        ids_path.write_text(json.dumps(ids, indent=1))
    for tracker in opened:
        log.info("tracker %s: %s%s", tracker.name, tracker.where, " (resumed)" if resumed else "")
    return Trackers(out_dir, opened)
