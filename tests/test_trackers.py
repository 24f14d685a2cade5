"""Experiment trackers (`train.report_to`): a real training run logs its metrics, resolved config and
artefacts to TensorBoard, W&B (offline, read back with wandb's own reader) and MLflow (a tracking
server on 127.0.0.1, queried with MlflowClient), and the resumed run continues the same tracker runs."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from taid_vlm.config import ConfigError, load_config
from taid_vlm.train.trackers import flat_config, numeric_metrics, open_trackers
from taid_vlm.train.trainer import Trainer
from tests.test_trainer_recipe import config
from tests.tracker_helpers import MlflowServer, tensorboard_scalars, wandb_history, wandb_runs
from tests.train_helpers import CONFIGS, evals, records, step_losses


def text_config(tmp_path, *overrides):
    return load_config(CONFIGS / "tiny_text.yaml", [f"output_dir={tmp_path}", *overrides])


def test_records_become_flat_numbers_and_the_config_flat_strings():
    record = {"step": 3, "time": 1.0, "loss": 0.5, "grad_norm": None, "ok": True, "event": "x",
              "skipped_samples": {"bad_image": 2, "note": "text"}, "samples_used": 12}
    assert numeric_metrics(record) == {"loss": 0.5, "skipped_samples/bad_image": 2.0, "samples_used": 12.0}
    assert flat_config({"optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "loss": {"params": {}}, "seed": 0}) == {
        "optim.lr": "0.0001", "optim.betas": "[0.9, 0.95]", "loss.params": "{}", "seed": "0"}


def test_report_to_takes_a_list_or_a_comma_separated_string_and_names_a_bad_tracker(tmp_path):
    assert text_config(tmp_path).train.report_to == ["tensorboard"]
    assert text_config(tmp_path, "train.report_to=wandb,mlflow").train.report_to == ["wandb", "mlflow"]
    assert text_config(tmp_path, "train.report_to=[mlflow]").train.report_to == ["mlflow"]
    assert text_config(tmp_path, "train.report_to=none").train.report_to == []
    with pytest.raises(ConfigError, match=r"^train.report_to: must be one of tensorboard, wandb, mlflow, got 'neptune'"):
        text_config(tmp_path, "train.report_to=tensorboard,neptune")


def test_missing_tensorboard_is_said_once_at_start_and_writes_no_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the tensorboard package
    with caplog.at_level(logging.INFO, logger="taid_vlm.train"):
        trackers = open_trackers(text_config(tmp_path), tmp_path, resumed=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["train.report_to: tensorboard is not installed, so no tensorboard/ folder is written "
                        "(pip install tensorboard, or leave tensorboard out of train.report_to)"]
    assert trackers.trackers == [] and not (tmp_path / "tensorboard").exists()


def test_installed_tensorboard_is_named_at_start_and_gets_the_scalars(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="taid_vlm.train"):
        trackers = open_trackers(text_config(tmp_path), tmp_path, resumed=False)
    assert f"tracker tensorboard: {tmp_path / 'tensorboard'}" in caplog.text
    for step, loss in ((1, 2.5), (2, 2.0)):
        trackers.log({"step": step, "loss": loss})
    trackers.log({"event": "end", "step": 2, "samples_used": 8})  # a marker, not a metric
    trackers.close()
    assert tensorboard_scalars(tmp_path / "tensorboard", "loss") == {1: 2.5, 2: 2.0}
    assert not (tmp_path / "trackers.json").exists()  # nothing to resume for TensorBoard but its folder


@pytest.fixture
def mlflow_server(tmp_path):
    root = tmp_path / "mlflow-server"
    root.mkdir()
    server = MlflowServer(root)
    yield server
    server.stop()


@pytest.mark.slow
def test_a_run_and_its_resumption_log_to_one_run_of_each_tracker(shapes_text, tmp_path, one_process_group,  # noqa: F811
                                                                 mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    tracked = ["train.tensorboard=true", "train.report_to=tensorboard,wandb,mlflow", "train.run_name=tracked",
               f"train.mlflow_tracking_uri={mlflow_server.uri}"]
    Trainer(config(shapes_text, out, "train.total_steps=2", *tracked)).setup().resume().fit()
    Trainer(config(shapes_text, out, "train.total_steps=4", "train.resume=true", *tracked)).setup().resume().fit()
    losses, eval_kl = step_losses(out), {s: r["eval_kl"] for s, r in evals(out).items()}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(eval_kl) == [2, 4]
    ids = json.loads((out / "trackers.json").read_text())

    # W&B: two local runs (the start and the resumption) with one run id; each holds its steps and config.
    first, second = wandb_runs(out / "wandb")
    starts = [next(r["run"] for r in run if r["type"] == "run") for run in (first, second)]
    assert [s["run_id"] for s in starts] == [ids["wandb"]] * 2 and starts[1].get("resume") is True
    assert starts[0]["project"] == "taid-vlm" and starts[0]["config"]["update"]["train"]["total_steps"] == 2
    logged = {**wandb_history(first), **wandb_history(second)}
    assert sorted(wandb_history(first)) == [1, 2] and sorted(wandb_history(second)) == [3, 4]
    assert {s: logged[s]["loss"] for s in losses} == pytest.approx(losses)
    assert logged[2]["eval_kl"] == pytest.approx(eval_kl[2]) and logged[4]["eval_kl"] == pytest.approx(eval_kl[4])
    updates = [r["config"] for r in second if r["type"] == "config"]
    assert any('"total_steps":4' in json.dumps(u, separators=(",", ":")) for u in updates)
    files = sorted((out / "wandb").glob("offline-run-*"))[-1] / "files"
    assert (files / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()
    assert (files / "config.yaml").read_text() == (out / "config.yaml").read_text()

    # MLflow: one run in the experiment, every step's loss and eval, the config as params, the artefacts.
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("taid-vlm")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]] and runs[0].info.run_name == "tracked"
    run_id = runs[0].info.run_id
    assert {m.step: m.value for m in client.get_metric_history(run_id, "loss")} == pytest.approx(losses)
    assert {m.step: m.value for m in client.get_metric_history(run_id, "eval_kl")} == pytest.approx(eval_kl)
    assert runs[0].data.params["optim.lr"] == "0.001" and runs[0].data.params["loss.name"] == "taid"
    assert runs[0].info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "metrics.jsonl"}
    fetched = client.download_artifacts(run_id, "metrics.jsonl", str(tmp_path))
    assert open(fetched).read() == (out / "metrics.jsonl").read_text()

    # TensorBoard: the resumed run appends to the same folder.
    assert tensorboard_scalars(out / "tensorboard", "loss") == pytest.approx(losses, rel=1e-6)
    assert len(records(out)) > 0


def test_overwrite_forgets_the_tracker_runs_but_keeps_the_trackers_own_stores(tmp_path):
    from taid_vlm.train.run_folder import clear_run_folder

    for name in ("trackers.json", "mlflow.db", "metrics.jsonl"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "wandb").mkdir()
    clear_run_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "wandb"]
