"""Atomic checkpoints: written under a temporary tag, renamed when complete, `latest` replaced last.

Layout: OUTPUT_DIR/checkpoints/step00000010/ (DeepSpeed engine state with the client state, which
holds the global data position once; rank_00000.pt per rank with its RNG states; COMPLETE) and
OUTPUT_DIR/checkpoints/latest (the tag). A crash
at any point leaves `latest` naming a complete checkpoint; half-written `.tmp-*` folders are ignored
and cleaned up by the next save.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .launch_env import barrier

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


def save_checkpoint(engine, root: Path, step: int, client_state: dict, rank_state: dict, rank: int,
                    keep_last: int) -> Path:
    """Every rank calls this. Returns the final checkpoint folder."""
    root = Path(root)
    final, tmp_tag = tag_for(step), f".tmp-{tag_for(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, root / tmp_tag / f"rank_{rank:05d}.pt")
    barrier()
    if rank == 0:
        _write_atomic(root / tmp_tag / COMPLETE, f"{step}\n")
        if (root / final).exists():
            shutil.rmtree(root / final)
        os.replace(root / tmp_tag, root / final)
        _write_atomic(root / "latest", final + "\n")
        for old in sorted(p for p in root.glob("step*") if p.is_dir())[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return root / final


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The folder `latest` names if complete, else the newest complete step folder, else None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step*") if (p / COMPLETE).is_file())
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
