"""Atomic checkpoints with the real DeepSpeed engine: a process SIGKILLed mid-write leaves the previous
checkpoint complete, pointed to by `latest`, and loadable; the next save cleans up the debris."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train_helpers import SUBPROCESS_TIMEOUT_S, env, one_engine_script

SCRIPT = one_engine_script(
    """
    if mode == "write":
        out = {}
        for step in (5, 10):
            train_step()
            ckpt.save_checkpoint(engine, root, step, {"step": step}, {"rank": rank}, rank, keep_last=2)
            out[step] = weights()
        train_step()
        def die(*args, **kwargs):          # SIGKILL after DeepSpeed wrote its part of step 15
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.torch.save = die
        print(json.dumps(out), flush=True)
        ckpt.save_checkpoint(engine, root, 15, {"step": 15}, {"rank": rank}, rank, keep_last=2)
    else:
        found = ckpt.latest_checkpoint(root)
        _, client = engine.load_checkpoint(root, tag=found.name)
        before = weights()
        train_step()
        ckpt.save_checkpoint(engine, root, 20, {"step": 20}, {"rank": rank}, rank, keep_last=2)
        print(json.dumps({"tag": found.name, "client_step": client["step"], "weights": before,
                          "rank_state": ckpt.load_rank_state(found, rank)}), flush=True)
    """,
    arg_name="mode", features=4, zero_stage=2)


def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path):
    from taid_vlm.train.checkpoint import COMPLETE, latest_checkpoint

    root = tmp_path / "checkpoints"
    write = subprocess.run([sys.executable, "-c", SCRIPT, str(root), "write"], env=env(), capture_output=True,
                           text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert write.returncode == -9, write.stderr[-3000:]  # killed, as planned
    saved = {int(k): v for k, v in json.loads(write.stdout.strip().splitlines()[-1]).items()}
    assert (root / ".tmp-step00000015").is_dir()  # the half-written checkpoint
    assert not (root / ".tmp-step00000015" / COMPLETE).exists()
    assert (root / "latest").read_text().strip() == "step00000010"
    assert latest_checkpoint(root).name == "step00000010"
    assert sorted(p.name for p in root.glob("step*")) == ["step00000005", "step00000010"]

    load = subprocess.run([sys.executable, "-c", SCRIPT, str(root), "load"], env=env(), capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert load.returncode == 0, load.stderr[-3000:]
    got = json.loads(load.stdout.strip().splitlines()[-1])
    assert got["tag"] == "step00000010" and got["client_step"] == 10 and got["rank_state"] == {"rank": 0}
    assert got["weights"] == pytest.approx(saved[10], abs=0)
    # The next save removed the debris and kept the last two.
    assert not list(root.glob(".tmp-*"))
    assert sorted(p.name for p in root.glob("step*")) == ["step00000010", "step00000020"]
