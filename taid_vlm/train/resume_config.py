"""`--resume` continues a run with the settings it was started with.

A run folder keeps the run's resolved config (OUTPUT_DIR/config.yaml, and a copy in every checkpoint).
Resuming takes that config, not the config file's current values: a run started with `--max-steps 600`
and stopped by Ctrl-C reaches step 600 after a plain `taid-vlm train CONFIG --resume`. Overrides given
on the resume command (`--max-steps 800`, `optim.lr=1e-4`) apply on top of the saved config and are
logged; the checkpoint compatibility check (preflight.check_resume_compatible) still refuses changes
to what the saved state depends on.

    cfg = run_config("configs/tiny_text.yaml", ["train.resume=true", "output_dir=runs/x"])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from taid_vlm.config import RunConfig, load_config

log = logging.getLogger("taid_vlm.train")


def run_config(path: str, overrides: Sequence[str]) -> RunConfig:
    """The config of a run: the file + overrides, or, when resuming a run that has a checkpoint, the
    run's saved config + the same overrides."""
    cfg = load_config(path, list(overrides))
    saved = _saved_run_config(cfg)
    if saved is None:
        return cfg
    saved["train"].update(resume=cfg.train.resume, overwrite=False)  # this command's, not the first run's
    resumed = load_config(data=saved, overrides=list(overrides))
    _log_resumed(saved, resumed)
    return resumed


def _saved_run_config(cfg: RunConfig) -> Optional[dict]:
    """The saved config of the checkpoint a resume would continue from (None: nothing to resume)."""
    from .checkpoint import latest_checkpoint
    from .preflight import saved_config

    if not cfg.train.resume or cfg.train.overwrite:
        return None
    found = latest_checkpoint(Path(cfg.resolve_path(cfg.output_dir)) / "checkpoints")
    saved = saved_config(found) if found is not None else None
    return saved if isinstance(saved, dict) and isinstance(saved.get("train"), dict) else None


def _log_resumed(saved: dict, resumed: RunConfig) -> None:
    from .launch_env import configure_logging
    from .preflight import config_differences

    configure_logging()  # before the trainer's: this line comes first
    new = resumed.to_dict()
    changed = [line for key in sorted(set(saved) | set(new)) for line in config_differences(saved.get(key), new.get(key), key)
               if not line.startswith(("train.resume:", "train.overwrite:"))]
    log.info("resuming with the run's saved config (%s)%s", Path(resumed.resolve_path(resumed.output_dir)) / "config.yaml",
             f"; changed on this command: {'; '.join(changed)}" if changed else "; nothing changed on this command")
