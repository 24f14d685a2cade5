"""Export never deletes or mixes: a non-empty destination is refused unless --overwrite (then replaced, not
merged), a crash leaves no half-written folder, files get the umask's permissions, user errors are one line."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from taid_vlm.folders import DestinationError, staged_folder
from taid_vlm.models import build_model, save_model
from taid_vlm.train.export import ExportError, write_student

from models_helpers import load_cfg, one_torch_thread  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def students():
    return {"vlm": build_model(load_cfg("tiny_vlm_student")), "text": build_model(load_cfg("tiny_text_student"))}


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("kind", ["vlm", "text"])  # before: a VLM export deleted DIR, a text export merged into it
def test_a_non_empty_destination_is_refused_and_left_as_it_was(tmp_path, students, kind):
    dest = tmp_path / "out"
    (dest / "sub").mkdir(parents=True)
    (dest / "notes.txt").write_text("mine")
    (dest / "sub" / "config.json").write_text("{}")
    before = tree(dest)
    with pytest.raises(ExportError, match=r"not empty; pass --overwrite to replace it \(.*out\)$"):
        write_student(students[kind], dest)
    assert tree(dest) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_overwrite_replaces_the_folder_and_never_merges(tmp_path, students, kind):
    fresh, dest = tmp_path / "fresh", tmp_path / "out"
    write_student(students[kind], fresh)
    dest.mkdir()
    (dest / "stale.safetensors").write_text("old weights")
    write_student(students[kind], dest, overwrite=True)
    assert sorted(tree(dest)) == sorted(tree(fresh))  # the same files as a fresh export, nothing of the old
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    write_student(students[kind], empty)  # an empty folder is fine without --overwrite
    assert sorted(tree(empty)) == sorted(tree(fresh))


def test_a_crash_leaves_no_half_written_folder_and_keeps_the_old_one(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with staged_folder(dest) as stage:
            (stage / "model.safetensors").write_text("half")
            raise RuntimeError("disk on fire")
    assert not dest.exists() and leftovers(tmp_path) == []
    dest.mkdir()
    (dest / "good.txt").write_text("last good export")
    with pytest.raises(RuntimeError):
        with staged_folder(dest, overwrite=True) as stage:
            (stage / "model.safetensors").write_text("half")
            raise RuntimeError("disk on fire")
    assert tree(dest) == {"good.txt": b"last good export"} and leftovers(tmp_path) == []
    # a killed export (no chance to clean up) leaves its staging folder; the next export removes it
    (tmp_path / ".out.tmp-deadbeef").mkdir()
    (tmp_path / ".out.tmp-deadbeef" / "half.safetensors").write_text("half")
    with staged_folder(dest, overwrite=True) as stage:
        (stage / "model.safetensors").write_text("new")
    assert tree(dest) == {"model.safetensors": b"new"} and leftovers(tmp_path) == []


def test_destinations_that_would_swallow_the_checkpoint_or_are_files_are_refused(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step00000002"
    ckpt.mkdir(parents=True)
    for dest in (tmp_path / "run", ckpt, ckpt / "export"):
        with pytest.raises(DestinationError, match="would hold or replace"):
            with staged_folder(dest, overwrite=True, protect=(ckpt,)):
                pass
    assert ckpt.is_dir()
    with staged_folder(tmp_path / "run" / "export", protect=(ckpt,)) as stage:  # beside the checkpoints: fine
        (stage / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="not a folder"):
        with staged_folder(tmp_path / "file", overwrite=True):
            pass


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_follow_the_umask(tmp_path, students, umask):
    """safetensors writes through a 0600 temp file and mkdtemp makes 0700 folders: before, exports were
    unreadable for the group."""
    old = os.umask(umask)
    try:
        write_student(students["vlm"], tmp_path / "vlm")
        write_student(students["text"], tmp_path / "text")
        save_model(students["vlm"], tmp_path / "saved")
    finally:
        os.umask(old)
    for root in (tmp_path / "vlm", tmp_path / "text", tmp_path / "saved"):
        for p in [root, *root.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(p.stat().st_mode) == want, (str(p), oct(p.stat().st_mode))


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "taid_vlm.cli", "export", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=str(REPO), timeout=900)


def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path):
    missing = _cli(tmp_path / "no_such_run", tmp_path / "out")
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"error: no complete checkpoint: expected a run folder, its checkpoints/ folder or a step folder holding "
        f"COMPLETE ({tmp_path / 'no_such_run'})"]
    # a complete-looking checkpoint and a non-empty destination: refused before anything is loaded
    ckpt = tmp_path / "run" / "checkpoints" / "step00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("1\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    busy = _cli(tmp_path / "run", tmp_path / "out")
    assert busy.returncode == 2 and "Traceback" not in busy.stderr
    assert busy.stderr.strip().splitlines() == [
        f"error: the destination folder is not empty; pass --overwrite to replace it ({tmp_path / 'out'})"]
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
