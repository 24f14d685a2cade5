"""Progress of long loops, readable wherever the output goes.

On a terminal: a tqdm bar. Anywhere else (a file, a pipe, a cluster job's log) a bar's carriage
returns make one line of thousands of characters, so plain log lines are written instead:

- training, one line per logged step (``StepProgress``):
  ``step 12/521 loss 2.3456 t 0.412 tokens/s 1234 ETA 3m12s``;
- evaluation and cache writing (``LoopProgress``): a line at most every ``LINE_INTERVAL_S`` seconds,
  so a loop of a few seconds prints nothing and a long one shows it is moving.

Both are created only where output is wanted (rank 0); the bar and the lines go to stderr, beside the
log.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger("taid_vlm.progress")

LINE_INTERVAL_S = 10.0


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stderr, where tqdm draws) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def duration(seconds: float) -> str:
    """45s, 3m12s, 2h05m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepProgress:
    """Training steps: a bar when ``bar`` and on a terminal, else one log line per ``update``."""

    def __init__(self, total: int, start: int, bar: bool = True):
        self.total, self.start = total, start
        self._t0 = time.perf_counter()
        self._bar = None
        if bar and on_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def update(self, step: int, loss: float, t: Optional[float], tokens_per_s: float, dropped: int = 0) -> None:
        if self._bar is not None:
            post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:.0f}"}
            if t is not None:
                post["t"] = f"{t:.3f}"
            if dropped:
                post["dropped"] = str(dropped)  # non-finite micro-batches left out so far
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        log.info(self.line(step, loss, t, tokens_per_s, dropped))

    def line(self, step: int, loss: float, t: Optional[float], tokens_per_s: float, dropped: int = 0) -> str:
        parts = [f"step {step}/{self.total}", f"loss {loss:.4f}"]
        if t is not None:
            parts.append(f"t {t:.3f}")
        parts.append(f"tokens/s {tokens_per_s:.0f}")
        if dropped:
            parts.append(f"dropped {dropped}")
        done = step - self.start
        if 0 < done and step < self.total:
            parts.append(f"ETA {duration((self.total - step) * (time.perf_counter() - self._t0) / done)}")
        return " ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class LoopProgress:
    """A loop of unknown or known length (``total``): a transient bar on a terminal, else a line at most
    every ``interval`` seconds (``desc: 40/120 batches, 12s, ETA 24s``). Disabled: does nothing."""

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "batches", enabled: bool = True,
                 interval: float = LINE_INTERVAL_S):
        self.desc, self.total, self.unit, self.enabled, self.interval = desc, total, unit, enabled, interval
        self.n = 0
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        if enabled and on_terminal():
            from tqdm.auto import tqdm

            one = unit[:-1] if unit.endswith("s") else unit  # tqdm's rate: batch/s
            self._bar = tqdm(total=total, desc=desc, unit=one, leave=False, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            log.info(self.line(now - self._t0))

    def line(self, elapsed: float) -> str:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        text = f"{self.desc}: {done} {self.unit}, {duration(elapsed)}"
        if self.total and 0 < self.n < self.total:
            text += f", ETA {duration((self.total - self.n) * elapsed / self.n)}"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "LoopProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
