"""A training run whose train or val shards hold no usable sample stops at setup, before any step, with
the skip counts by reason (no hang, no 0.0 metric after all the steps)."""

from __future__ import annotations

import json
import subprocess

import pytest

from data_helpers import write_tar
from tests.train_helpers import env, train_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    good = [{"__key__": f"g{i}", "json": json.dumps({"text": "red circle " * (1 + i % 3)}).encode()} for i in range(16)]
    bad = [{"__key__": f"b{i}", "json": b"{not json"} for i in range(5)]
    (root / "good").mkdir()
    (root / "bad").mkdir()
    write_tar(root / "good" / "0.tar", good)
    write_tar(root / "bad" / "0.tar", bad)
    (root / "bad" / "1.tar").write_bytes(b"")  # an empty shard too
    return root


@pytest.mark.parametrize("bad_set,where", [("val", "eval data"), ("train", "train data")])
def test_all_bad_data_is_an_error_at_start(shards, tmp_path, bad_set, where):
    paths = {"train": shards / "good", "val": shards / "good", bad_set: shards / "bad"}
    out = tmp_path / "run"
    cmd = train_cmd("tiny_text.yaml", out, f"data.train={paths['train']}", f"data.val={paths['val']}",
                    "data.synthetic=null", "train.total_steps=2", "data.num_workers=0")
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert f"{where}: no usable sample in a full pass over 2 shard(s)" in proc.stderr
    assert "bad_json=5" in proc.stderr
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or '"loss"' not in metrics.read_text()  # stopped before step 1


def test_mostly_unusable_train_data_stops_after_the_first_steps(shards, tmp_path):
    """One usable sample among 120 bad ones used to train every step on that one sample and exit 0."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    bad = [{"__key__": f"b{i}", "json": b"{not json"} for i in range(120)]
    good = [{"__key__": "g0", "json": json.dumps({"text": "red circle red circle"}).encode()}]
    write_tar(mixed / "0.tar", bad[:60] + good + bad[60:])
    out = tmp_path / "run"
    cmd = train_cmd("tiny_text.yaml", out, f"data.train={mixed}", f"data.val={shards / 'good'}", "data.synthetic=null",
                    "train.total_steps=50", "data.num_workers=0")
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "training samples read" in errors[0] and "over data.max_skipped_fraction 0.5" in errors[0]
    assert "bad_json=" in errors[0] and errors[0].endswith("(data.train)")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert 1 <= len(steps) < 5, steps  # judged as soon as MIN_SAMPLES samples were read, not after 50 steps
