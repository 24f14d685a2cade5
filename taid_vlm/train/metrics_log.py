"""Rank-0 logging: metrics.jsonl (one JSON object per logged step or eval), the experiment trackers of
`train.report_to` (trackers.py), and the step progress (taid_vlm.progress: a bar on a terminal, else one
line per logged step with step, loss, t, tokens/s and ETA)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

from taid_vlm.progress import StepProgress

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
        # The bar on a terminal (train.progress_bar: false turns it off); one line per logged step elsewhere.
        self._bar = StepProgress(total_steps, start_step, bar=progress_bar)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def progress(self, step: int, loss: float, t: Optional[float], tokens_per_s: float, dropped: int = 0) -> None:
        if self._bar is not None:
            self._bar.update(step, loss, t, tokens_per_s, dropped)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()  # complete before the trackers take it as an artefact
        if self.trackers is not None:
            self.trackers.close()
