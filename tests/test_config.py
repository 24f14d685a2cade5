"""Run configs: typed loading, overrides, errors that name the key."""

import subprocess

import pytest

from taid_vlm.config import ConfigError, apply_override, load_config
from tests.train_helpers import BIN, CONFIGS, SUBPROCESS_TIMEOUT_S, env


def test_tiny_configs_load_and_resolve_paths():
    cfg = load_config(CONFIGS / "tiny_vlm.yaml")
    assert cfg.loss.name == "taid" and cfg.loss.params["t_start"] == 0.4
    assert cfg.student.model["type"] == "composed" and cfg.teacher.model["llm"]["config"]["hidden_size"] == 128
    assert cfg.resolve_path(cfg.data.train) == str((CONFIGS.parent / "data/shapes/train").resolve())
    text = load_config(CONFIGS / "tiny_text.yaml")
    assert text.data.text_only and text.student.model["type"] == "causal_lm"


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny_vlm.yaml", ["optim.lr=3e-4", "train.total_steps=7", "loss.name=fkl",
                                                  "loss.params={}", "deepspeed.extra={zero_optimization: {stage: 2}}"])
    assert cfg.optim.lr == 3e-4 and cfg.train.total_steps == 7 and cfg.loss.name == "fkl"
    assert cfg.deepspeed.extra == {"zero_optimization": {"stage": 2}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.precison=bf16", r"train.precison: unknown key"),
        ("train.precision=fp16", r"train.precision: must be one of fp32, bf16, got 'fp16'"),
        ("optim.lr=-1", r"optim.lr: must be > 0"),
        ("optim.lr=fast", r"optim.lr: expected a number"),
        ("train.total_steps=2.5", r"train.total_steps: expected an integer"),
        ("loss.name=kld", r"loss.name: must be one of"),
        ("loss.params={t_start: 1.5}", r"loss.params: taid: t_start must be in \[0.0, 1.0\]"),
        ("loss.params={temperature: 2}", r"loss.params: loss 'taid' got unknown parameter"),
        ("deepspeed.zero_stage=4", r"deepspeed.zero_stage: must be one of 0, 1, 2, 3"),
        ("teacher.placement=everywhere", r"teacher.placement: must be one of replicated, zero3"),
        ("data.pack=true", r"data.pack: packing needs data.text_only"),
        ("deepspeed.config_file=missing.json", r"deepspeed.config_file: file not found"),
        ("train.resume=maybe", r"train.resume"),
        ("teacher.model=nowhere.yaml", r"teacher.model: file not found"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny_vlm.yaml", [override])


def test_missing_sections_are_named():
    with pytest.raises(ConfigError, match="student.model: required"):
        load_config(data={"data": {"train": "x"}})
    with pytest.raises(ConfigError, match="teacher.model: required by loss 'taid'"):
        load_config(data={"student": {"model": {"type": "causal_lm"}}, "data": {"train": "x"}})
    with pytest.raises(ConfigError, match="data.train: required"):
        load_config(data={"student": {"model": {"type": "causal_lm"}}, "loss": {"name": "ce"}})


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_override({}, "optim.lr")
    with pytest.raises(ConfigError, match="optim: is not a section"):
        apply_override({"optim": 3}, "optim.lr=1")


def test_cli_reports_config_errors_before_anything_heavy(tmp_path):
    proc = subprocess.run([str(BIN / "taid-vlm"), "train", str(CONFIGS / "tiny_vlm.yaml"), "--output-dir",
                           str(tmp_path), "optim.betaz=[0.9, 0.9]"], env=env(), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 2
    assert "error: unknown key (known here: " in proc.stderr and proc.stderr.rstrip().endswith("(optim.betaz)")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_validates(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.student.model is not None and cfg.train.total_steps > 0
