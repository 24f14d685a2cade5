"""End to end: cache the tiny text recipe's teacher with the CLI, then train from the cache with the
teacher model removed from the config (so it cannot be built), with a resume in the middle."""

import json

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
