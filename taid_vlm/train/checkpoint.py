"""Atomic checkpoints: written under a temporary tag, renamed when complete, `latest` replaced last.

Layout: OUTPUT_DIR/checkpoints/step00000010/ (DeepSpeed engine state with the client state, which
holds the global data position once; rank_00000.pt per rank with its RNG states; COMPLETE) and
OUTPUT_DIR/checkpoints/latest (the tag). A crash
at any point leaves `latest` naming a complete checkpoint; half-written `.tmp-*` folders are ignored
and cleaned up by the next save (and at the start of a run). A full disk or a read-only folder is one
line (CheckpointWriteError) with the free space needed, and leaves no temporary folder behind.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from taid_vlm.errors import UserError

from .launch_env import all_reduce_sum, barrier

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(UserError):
    """The checkpoint could not be written (disk full, read-only, no permission); the previous one is intact."""


_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_ACCESS_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def step_of(folder: Path) -> int:
    try:
        return int(Path(folder).name.removeprefix("step"))
    except ValueError:
        return -1


def estimated_bytes(root: Path, engine) -> int:
    """What the next checkpoint needs: the size of the newest complete one, else 16 bytes per trainable
    parameter (fp32 weights, Adam's two moments, slack) and 4 per frozen one."""
    previous = latest_checkpoint(root)
    if previous is not None:
        return _folder_bytes(previous)
    total = 0
    for p in engine.module.parameters():
        n = int(getattr(p, "ds_numel", 0)) or p.numel()
        total += n * (16 if p.requires_grad else 4)
    return total


def _write_error(root: Path, tag: str, error: Optional[BaseException], needed: int) -> CheckpointWriteError:
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    previous = latest_checkpoint(root) if root.exists() else None
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    code = getattr(error, "errno", None)
    if code in _ACCESS_ERRNOS:
        what = f"cannot write checkpoint {tag}: {os.strerror(code).lower()}; choose a writable --output-dir"
    elif code in _SPACE_ERRNOS or error is None or free < needed:
        what = (f"cannot write checkpoint {tag}: not enough disk space ({_mb(free)} free, a checkpoint needs about "
                f"{_mb(needed)}); free some space (or lower train.keep_last) and continue with --resume")
    else:
        what = f"cannot write checkpoint {tag}: {error}"
    return CheckpointWriteError(f"{what}; {kept}", where=str(root))


def _is_write_failure(error: BaseException, root: Path, needed: int) -> bool:
    """OSErrors, and torch's zip writer on a full disk (`RuntimeError: ... unexpected pos ...`)."""
    if isinstance(error, OSError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        any(w in text for w in ("unexpected pos", "streamwriter", "write", "no space"))
        or shutil.disk_usage(root).free < needed)


def save_checkpoint(engine, root: Path, step: int, client_state: dict, rank_state: dict, rank: int,
                    keep_last: int, run_config: Optional[dict] = None) -> Path:
    """Every rank calls this. Returns the final checkpoint folder.

    Too little free space is found before anything is written; a write that fails anyway (disk full,
    read-only, permissions) removes its temporary folder and raises CheckpointWriteError on every rank:
    `latest` and the previous checkpoint are untouched. `run_config` is stored as the checkpoint's
    config.yaml (what --resume compares the new config against).
    """
    root = Path(root)
    final, tmp_tag = tag_for(step), f".tmp-{tag_for(step)}"
    device = getattr(engine, "device", torch.device("cpu"))
    needed = estimated_bytes(root, engine) if root.exists() else 0
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            needed = needed or estimated_bytes(root, engine)
            if shutil.disk_usage(root).free < needed:
                error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            error = e
    if all_reduce_sum([1.0 if error is not None else 0.0], device)[0] > 0:
        raise _write_error(root, final, error, needed)
    barrier()
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, root / tmp_tag / f"rank_{rank:05d}.pt")
        if rank == 0 and run_config is not None:
            _write_atomic(root / tmp_tag / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
    except (OSError, RuntimeError) as e:
        if not _is_write_failure(e, root, needed):
            raise
        error = e
    if all_reduce_sum([1.0 if error is not None else 0.0], device)[0] > 0:
        barrier()
        if rank == 0:
            shutil.rmtree(root / tmp_tag, ignore_errors=True)
        barrier()
        raise _write_error(root, final, error, needed)
    barrier()
    if rank == 0:
        _write_atomic(root / tmp_tag / COMPLETE, f"{step}\n")
        if (root / final).exists():
            shutil.rmtree(root / final)
        os.replace(root / tmp_tag, root / final)
        _write_atomic(root / "latest", final + "\n")
        prune(root, keep=root / final, keep_last=keep_last)
    barrier()
    return root / final


def prune(root: Path, keep: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders by step number; `keep` (just written) always stays."""
    others = sorted((p for p in Path(root).glob("step*") if p.is_dir() and p != keep), key=step_of)
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The folder `latest` names if complete, else the newest complete step folder, else None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    complete = sorted((p for p in root.glob("step*") if (p / COMPLETE).is_file()), key=step_of)
    return complete[-1] if complete else None


def resolve_checkpoint(path: Path) -> Path:
    """Accept a run's output dir, its checkpoints/ folder, or one step folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / COMPLETE).is_file():
            return candidate
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint at {path} (looked for COMPLETE, checkpoints/latest, step*/)")


def load_rank_state(checkpoint: Path, rank: int) -> dict:
    """This rank's RNG states (and schedule copy). A rank the writing run did not have (resuming on more
    processes) takes rank 0's; the data position is not here but in the client state, stored once."""
    path = Path(checkpoint) / f"rank_{rank:05d}.pt"
    if not path.is_file():
        path = Path(checkpoint) / f"rank_{0:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the checkpoint is incomplete")
    return torch.load(path, weights_only=False)
