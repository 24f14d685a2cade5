"""A run folder belongs to one run.

OUTPUT_DIR holds what a run writes: checkpoints/, metrics.jsonl, config.yaml, tensorboard/, trackers.json
(its W&B / MLflow run ids; the trackers' own stores, wandb/ and mlflow.db, are kept). A new run
in a folder that already holds another run's checkpoints or metrics is refused unless the user says
what they want: `--resume` continues that run (metrics.jsonl is appended to), `--overwrite` deletes
exactly those five entries (never any other file in the folder) and starts fresh. Otherwise pruning
by step name, `latest` and metrics.jsonl would mix two runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from taid_vlm.errors import UserError

RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "config.yaml", "tensorboard", "trackers.json")


def previous_run(out_dir: Path) -> list[str]:
    """What of another run the folder holds (empty: the folder is free for a new run)."""
    out_dir = Path(out_dir)
    found = []
    ckpts = out_dir / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step*")) if ckpts.is_dir() else []
    if steps:
        found.append(f"checkpoints {steps[0]}..{steps[-1]}" if len(steps) > 1 else f"checkpoint {steps[0]}")
    if (out_dir / "metrics.jsonl").is_file() and (out_dir / "metrics.jsonl").stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def check_run_folder(out_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a new run in the folder of another run (unless resuming it or overwriting it)."""
    found = previous_run(out_dir) if not resuming else []
    if found and not overwrite:
        raise UserError(f"the output folder already holds another run ({', '.join(found)}); continue it with --resume, "
                        "replace it with --overwrite, or choose another --output-dir", where=str(out_dir))


def clear_run_folder(out_dir: Path) -> None:
    """`--overwrite`: delete what a run writes (RUN_ENTRIES), nothing else the folder holds."""
    out_dir = Path(out_dir)
    for name in RUN_ENTRIES:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def clean_stale_temporaries(ckpt_root: Path) -> list[str]:
    """Half-written `.tmp-*` checkpoint folders of a crashed or killed save (never complete, never named by latest)."""
    ckpt_root = Path(ckpt_root)
    removed = []
    if ckpt_root.is_dir():
        for stale in [*ckpt_root.glob(".tmp-*"), *ckpt_root.glob(".*.tmp-*")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale.name)
    return removed
