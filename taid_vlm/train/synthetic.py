"""Generate a config's synthetic shards when they are missing (tiny recipes run out of the box)."""

from __future__ import annotations

import logging
from pathlib import Path

from taid_vlm.config import RunConfig

from .launch_env import barrier

log = logging.getLogger("taid_vlm.train")


def ensure_synthetic_data(cfg: RunConfig, rank: int) -> None:
    synth = cfg.data.synthetic
    if synth is None:
        return
    out = Path(cfg.resolve_path(cfg.data.synthetic_dir))
    if rank == 0 and not (out / "manifest.json").is_file():
        from taid_vlm.data.synthetic import synth as write_synthetic

        log.info("synthetic data missing: generating %d %s samples (seed %d) into %s", synth.n, synth.kind, synth.seed, out)
        write_synthetic(out, synth.n, seed=synth.seed, size=synth.size, val_fraction=synth.val_fraction,
                        text_only=synth.kind == "shapes_text")
    barrier()
