"""A full disk or a read-only folder while checkpointing (real DeepSpeed engine): one line naming the folder
and the space needed, no `.tmp-*` left behind, `latest` and the previous checkpoint untouched and loadable.
Faults: a real 1 MiB tmpfs filled up (when this machine lets us mount one), and simulated ENOSPC / EROFS /
torch's `unexpected pos` RuntimeError in the writers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from tests.train_helpers import env, one_engine_script

SCRIPT = one_engine_script(
    """
    train_step()
    ckpt.save_checkpoint(engine, root, 5, {"step": 5}, {"rank": rank}, rank, keep_last=2, run_config={"seed": 0})
    saved = weights()
    train_step()
    size = sum(f.stat().st_size for f in (ckpt.Path(root) / "step00000005").rglob("*") if f.is_file())
    if fault == "tmpfs_precheck":        # fill the disk: less free than one checkpoint
        free = shutil.disk_usage(root).free
        with open(os.path.join(os.path.dirname(root), "filler"), "wb") as f:
            f.write(b"0" * max(0, free - size // 2))
    elif fault == "tmpfs_midwrite":      # same, and the estimate says it fits: the writers hit ENOSPC for real
        free = shutil.disk_usage(root).free
        with open(os.path.join(os.path.dirname(root), "filler"), "wb") as f:
            f.write(b"0" * max(0, free - size // 2))
        ckpt.estimated_bytes = lambda root, engine: 1
    elif fault == "enospc":
        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        ckpt.torch.save = full
    elif fault == "unexpected_pos":      # what torch's zip writer raises on a full disk
        real_save = engine.save_checkpoint
        def cut(save_dir, tag, **kw):
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb").write(b"PK")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        engine.save_checkpoint = cut
        ckpt.shutil.disk_usage = lambda p: shutil._ntuple_diskusage(100, 99, 1)
    elif fault == "readonly":
        def ro(*a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        ckpt.torch.save = ro
    error = None
    try:
        ckpt.save_checkpoint(engine, root, 10, {"step": 10}, {"rank": rank}, rank, keep_last=2, run_config={"seed": 0})
    except ckpt.CheckpointWriteError as e:
        error = str(e)
    # The previous checkpoint still loads and holds the step-5 weights.
    found = ckpt.latest_checkpoint(root)
    _, client = engine.load_checkpoint(root, tag=found.name)
    print(json.dumps({"error": error, "tag": found.name, "client_step": client["step"], "ok": weights() == saved,
                      "tmp": sorted(p.name for p in ckpt.Path(root).glob(".tmp-*")),
                      "steps": sorted(p.name for p in ckpt.Path(root).glob("step*")),
                      "latest": (ckpt.Path(root) / "latest").read_text().strip()}), flush=True)
    """,
    arg_name="fault", features=64, zero_stage=0)


def _run(root, fault: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root), fault], env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_previous_intact(got: dict, root) -> None:
    assert got["tag"] == "step00000005" and got["client_step"] == 5 and got["ok"]
    assert got["latest"] == "step00000005" and got["steps"] == ["step00000005"]
    assert got["tmp"] == []  # no half-written .tmp-step* left behind
    assert str(root) in got["error"]


@pytest.mark.parametrize("fault", ["enospc", "unexpected_pos"])
def test_simulated_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, fault):
    root = tmp_path / "checkpoints"
    got = _run(root, fault)
    _assert_previous_intact(got, root)
    assert "cannot write checkpoint step00000010: not enough disk space" in got["error"]
    assert "a checkpoint needs about" in got["error"] and "the previous checkpoint step00000005 is intact" in got["error"]
    assert "\n" not in got["error"]


def test_read_only_folder_is_one_line(tmp_path):
    root = tmp_path / "checkpoints"
    got = _run(root, "readonly")
    _assert_previous_intact(got, root)
    assert "read-only file system" in got["error"] and "writable --output-dir" in got["error"]


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", f"h6-{uuid.uuid4().hex[:8]}", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("fault", ["tmpfs_precheck", "tmpfs_midwrite"])
def test_real_full_tmpfs(small_tmpfs, fault):
    root = small_tmpfs / "checkpoints"
    got = _run(root, fault)
    _assert_previous_intact(got, root)
    assert "not enough disk space" in got["error"]
