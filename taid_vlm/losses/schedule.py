"""The TAID interpolation schedule: t moves from t_start to t_end, faster while the loss falls.

Once per OPTIMIZER step, with J the loss of that step averaged over micro-batches and ranks:
    delta = (J_prev - J) / (J_prev + eps);   m = beta * m + (1 - beta) * delta
    t = min(t_end, max(t_linear(step), t + alpha * sigmoid(m) * (1 - t)))
    t_linear(step) = t_start + (t_end - t_start) * step / total_steps
The first update only records J. Unlike the public reference code, which updates t on every
micro-batch (and on validation batches) from each GPU's own loss, this is fed one globally averaged
loss per optimizer step, so every rank holds the same t.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

from .params import check_range

EPS = 1e-15  # as in the reference implementation


@dataclass
class TAIDSchedule:
    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    adaptive: bool = True
    t: float = math.nan
    momentum: float = 0.0
    prev_loss: Optional[float] = None

    def __post_init__(self):
        loss = "taid" if self.adaptive else "taid_linear"
        self.t_start = check_range(loss, "t_start", self.t_start, 0.0, 1.0)
        self.t_end = check_range(loss, "t_end", self.t_end, self.t_start, 1.0)
        self.alpha = check_range(loss, "alpha", self.alpha, 0.0, 1.0)
        self.beta = check_range(loss, "beta", self.beta, 0.0, 1.0, high_open=True)
        if math.isnan(self.t):
            self.t = self.t_start

    def linear(self, step: int, total_steps: int) -> float:
        progress = min(max(step / total_steps, 0.0), 1.0)
        return self.t_start + (self.t_end - self.t_start) * progress

    def update(self, loss: float, step: int, total_steps: int) -> float:
        loss = float(loss)
        if not math.isfinite(loss):
            warnings.warn(f"TAID schedule: ignoring non-finite step loss {loss} at step {step}", stacklevel=2)
            return self.t
        if not self.adaptive:
            self.t = self.linear(step, total_steps)
            return self.t
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        delta = (self.prev_loss - loss) / (self.prev_loss + EPS)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
        pushed = self.t + self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
        self.t = min(self.t_end, max(self.linear(step, total_steps), pushed))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        missing = {"t", "momentum", "prev_loss"} - set(state)
        if missing:
            raise KeyError(f"TAID schedule state lacks {sorted(missing)}")
        self.t = float(state["t"])
        self.momentum = float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
