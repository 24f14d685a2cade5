"""`taid-vlm compare --losses` with methods: LOSS+MODE and the paper's protocols as the official TAID
code ran them (gkd = gjsd 0.1 + mixed, distillm = sfkl 0.1 + adaptive)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from taid_vlm.cli import main
from taid_vlm.experiments.compare import CompareError, parse_losses
from taid_vlm.experiments.methods import method_overrides
from tests.train_helpers import SUBPROCESS_TIMEOUT_S, env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method,want", [
    ("taid", ["loss.name=taid"]),                       # the config's own loss keeps its parameters
    ("fkl", ["loss.name=fkl", "loss.params={}"]),
    ("taid+on_policy", ["loss.name=taid", "sampling.mode=on_policy"]),
    ("fkl+mixed", ["loss.name=fkl", "loss.params={}", "sampling.mode=mixed"]),
    ("gkd", ["loss.name=gjsd", "loss.params={beta: 0.1}", "sampling.mode=mixed"]),
    ("distillm", ["loss.name=sfkl", "loss.params={skew: 0.1}", "sampling.mode=adaptive"]),
])
def test_method_overrides(method, want):
    assert method_overrides(method, config_loss="taid") == want


@pytest.mark.parametrize("text,message", [("taid+greedy", "unknown loss 'taid+greedy'"),
                                          ("gkdd", "unknown loss 'gkdd'"), ("taid,gkd,gkd", "listed twice")])
def test_bad_methods_are_named(text, message):
    with pytest.raises(CompareError, match=re.escape(message)):
        parse_losses(text)
    assert parse_losses("taid,taid+on_policy,gkd,distillm") == ["taid", "taid+on_policy", "gkd", "distillm"]


def test_a_method_the_config_cannot_run_fails_before_any_run(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    argv = ["compare", "configs/tiny_vlm.yaml", "--losses", "taid,gkd", "--out", str(tmp_path / "cmp")]
    assert main(argv) == 2
    assert "config error for method gkd: sampling.mode: mixed's replay buffer holds text only" in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "runs").exists()


@pytest.mark.slow
def test_compare_runs_the_papers_protocols_and_on_policy_taid(tmp_path):
    out, methods = tmp_path / "cmp", ["taid", "taid+on_policy", "gkd", "distillm"]
    cmd = [sys.executable, "-m", "taid_vlm.cli", "compare", str(REPO / "configs/tiny_text.yaml"),
           "--losses", ",".join(methods), "--seeds", "1", "--steps", "3", "--out", str(out),
           f"data.synthetic_dir={tmp_path / 'data'}", f"data.train={tmp_path / 'data/train'}",
           f"data.val={tmp_path / 'data/val'}", "data.synthetic.n=60", "train.eval_batches=1",
           "sampling.max_new_tokens=8", "sampling.lmbda=1.0"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "compare.json").read_text())
    assert payload["losses"] == methods and all(payload["per_run"][m][0]["eval_kl"] >= 0 for m in methods)
    ran = {m: yaml.safe_load((out / "runs" / m / "seed0" / "config.yaml").read_text()) for m in methods}
    assert [(ran[m]["loss"]["name"], ran[m]["sampling"]["mode"]) for m in methods] == [
        ("taid", "off"), ("taid", "on_policy"), ("gjsd", "mixed"), ("sfkl", "adaptive")]
    assert ran["gkd"]["loss"]["params"] == {"beta": 0.1} and ran["distillm"]["loss"]["params"] == {"skew": 0.1}
    assert ran["taid+on_policy"]["loss"]["params"] == ran["taid"]["loss"]["params"]
    md = (out / "compare.md").read_text()
    assert "| taid+on_policy | 1 |" in md and "| gkd | 1 |" in md and "| distillm | 1 |" in md
