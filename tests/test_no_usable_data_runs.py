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
