"""Rank-0 logging: metrics.jsonl (one JSON object per logged step or eval), the experiment trackers of
`train.report_to` (trackers.py), and a progress bar with step, loss, t, tokens/s and ETA."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

from .trackers import Trackers

log = logging.getLogger("taid_vlm.train")


class MetricsLog:
    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 progress_bar: bool = True, trackers: Optional[Trackers] = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.trackers = trackers
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def progress(self, step: int, loss: float, t: Optional[float], tokens_per_s: float, dropped: int = 0) -> None:
        if self._bar is None:
            return
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:.0f}"}
        if t is not None:
            post["t"] = f"{t:.3f}"
        if dropped:
            post["dropped"] = str(dropped)  # non-finite micro-batches left out so far
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()  # complete before the trackers take it as an artefact
        if self.trackers is not None:
            self.trackers.close()
