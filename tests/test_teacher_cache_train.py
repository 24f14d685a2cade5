"""End to end: cache the tiny text recipe's teacher with the CLI, then train from the cache with the
teacher model removed from the config (so it cannot be built), with a resume in the middle."""

import json

import pytest

from taid_vlm.config import load_config
from train_helpers import BIN, REPO, records, run, step_losses, train_cmd


def test_cache_then_train_without_a_teacher_model(tmp_path):
    cache = tmp_path / "topk64"
    proc = run([str(BIN / "python"), "-m", "data_tools.cache_teacher", str(REPO / "configs/tiny_text.yaml"),
                "--k", "64", "--out", str(cache)])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["k"] == 64 and summary["cached"] > 0 and summary["payload_bytes_per_supervised_token"] < 400
    manifest = json.loads((cache / "manifest.json").read_text())
    assert {s["split"] for s in manifest["shards"]} == {"train", "val"}

    out = tmp_path / "run"
    common = ["teacher.model=null", f"teacher.cache={cache}", "train.total_steps=8", "train.log_every=1"]
    proc = run(train_cmd("tiny_text.yaml", out, *common, "train.save_every=4", "train.total_steps=4"))
    assert "teacher from cache" in proc.stderr + proc.stdout
    run(train_cmd("tiny_text.yaml", out, *common, "train.resume=true"))
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 9)) and all(v == v for v in losses.values())
    end = [r for r in records(out) if "eval_kl" in r][-1]
    assert end["eval_tokens"] > 0 and end["eval_teacher_ce"] > 0 and 0 <= end["eval_top1_agreement"] <= 1
    assert [r for r in records(out) if r.get("event") == "resume"]


@pytest.mark.slow
def test_hidden_state_cache_trains_like_the_online_teacher(tmp_path):
    """`--format hidden`, then the same run (seed, steps, data order) online and from the cache: the step
    losses and the held-out metrics agree to float32 rounding (the teacher forward of differently padded
    batches), where a top-k cache of this flat random teacher would be off by tens of percent. The teacher
    is saved first, so the writer and the online run load the same weights."""
    from taid_vlm.models import save_model
    from taid_vlm.train.components import build_role_model

    save_model(build_role_model(load_config(REPO / "configs/tiny_text.yaml").teacher.model, "teacher"), tmp_path / "t")
    teacher = f"teacher.model={{saved: {tmp_path / 't'}}}"
    cache = tmp_path / "hidden"
    proc = run([str(BIN / "python"), "-m", "data_tools.cache_teacher", str(REPO / "configs/tiny_text.yaml"),
                "--format", "hidden", "--out", str(cache), teacher])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["format"] == "hidden" and summary["k"] is None and summary["cached"] > 0
    common = ["train.total_steps=4", "train.log_every=1", "data.num_workers=2"]
    run(train_cmd("tiny_text.yaml", tmp_path / "online", *common, teacher))
    run(train_cmd("tiny_text.yaml", tmp_path / "cached", *common, teacher, f"teacher.cache={cache}"))
    online, cached = step_losses(tmp_path / "online"), step_losses(tmp_path / "cached")
    assert sorted(cached) == [1, 2, 3, 4]
    for step, value in online.items():
        assert cached[step] == pytest.approx(value, rel=1e-4), step
    end_on = [r for r in records(tmp_path / "online") if "eval_kl" in r][-1]
    end_ca = [r for r in records(tmp_path / "cached") if "eval_kl" in r][-1]
    for key in ("eval_kl", "eval_teacher_ce", "eval_student_ce", "eval_top1_agreement"):
        assert end_ca[key] == pytest.approx(end_on[key], rel=1e-4, abs=1e-6), key
