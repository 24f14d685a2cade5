"""Divergence guard: stop a run that has blown up or collapsed, before it writes a useless checkpoint.

Three signs, each a clear message and a stop (`DivergenceError`):
- collapse: the gradient norm is exactly zero for `max_zero_grad_steps` optimizer steps in a row after
  the first step (e.g. `optim.lr=1e6`: the student saturates, nothing flows back, yet the loss stays
  finite and the run would "succeed");
- a loss jump: the step loss exceeds `loss_jump_factor` times the median of the recent steps;
- at save time: parameters that are non-finite, or whose norm grew by more than `param_growth_factor`
  since the last checkpoint (or the run start) are never written (e.g. `optim.lr=1e30`: one step
  multiplies the weights by ~1e29 while they stay finite, and the next loss is NaN).
Non-finite losses themselves are handled per micro-batch by the trainer (dropped and counted).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional

import torch


class DivergenceError(RuntimeError):
    """The run diverged or collapsed; nothing after the last good checkpoint is saved."""


HINT = "Lower optim.lr (or raise optim.warmup_steps), check the teacher and the data; the last checkpoint is untouched"


class DivergenceGuard:
    def __init__(self, loss_jump_factor: float = 100.0, max_zero_grad_steps: int = 3, param_growth_factor: float = 100.0,
                 window: int = 20, min_history: int = 5):
        self.loss_jump_factor = loss_jump_factor
        self.max_zero_grad_steps = max_zero_grad_steps
        self.param_growth_factor = param_growth_factor
        self.min_history = min_history
        self.recent: deque[float] = deque(maxlen=window)
        self.zero_grad_in_a_row = 0
        self.reference_norm: Optional[float] = None

    def after_step(self, step: int, loss: float, grad_norm: Optional[float]) -> None:
        """Call once per optimizer step with the loss averaged over ranks and the global gradient norm."""
        if grad_norm is not None and self.max_zero_grad_steps and step > 1:
            self.zero_grad_in_a_row = self.zero_grad_in_a_row + 1 if grad_norm == 0.0 else 0
            if self.zero_grad_in_a_row >= self.max_zero_grad_steps:
                raise DivergenceError(
                    f"the run collapsed: the gradient norm has been exactly 0 for {self.zero_grad_in_a_row} steps in "
                    f"a row (step {step}, loss {loss:.4g}): the student no longer learns. {HINT} "
                    "(train.max_zero_grad_steps: 0 turns this check off)")
        if self.loss_jump_factor and len(self.recent) >= self.min_history and math.isfinite(loss):
            median = statistics.median(self.recent)
            # Orders of magnitude AND more than one nat: 1e-4 -> 1e-2 near convergence is not a divergence.
            if median > 0 and loss > self.loss_jump_factor * median and loss > median + 1.0:
                raise DivergenceError(
                    f"the run diverged: the loss jumped to {loss:.4g} at step {step}, {loss / median:.3g} times the "
                    f"median {median:.4g} of the last {len(self.recent)} steps. {HINT} "
                    "(train.loss_jump_factor: 0 turns this check off)")
        if math.isfinite(loss):
            self.recent.append(loss)

    def set_reference(self, norm: float) -> None:
        """The parameter norm of a known-good state: the run start, a resumed or a written checkpoint."""
        self.reference_norm = norm

    def check_before_save(self, step: int, norm: float) -> None:
        """Raise instead of letting a checkpoint of step `step` with parameter norm `norm` be written."""
        if not math.isfinite(norm):
            raise DivergenceError(f"the parameters after step {step} are not finite: no checkpoint written. {HINT}")
        ref = self.reference_norm
        if self.param_growth_factor and ref and norm > self.param_growth_factor * ref:
            raise DivergenceError(
                f"the run diverged: the parameter norm grew from {ref:.4g} to {norm:.4g} ({norm / ref:.3g} times) by "
                f"step {step}: no checkpoint written. {HINT} (train.param_growth_factor: 0 turns this check off)")
        self.reference_norm = norm


def parameter_norm(module: torch.nn.Module, zero3: bool, reduce_sum) -> float:
    """L2 norm of the trainable parameters (inf/nan when one is non-finite); ZeRO-3 partitions are summed over ranks.

    `reduce_sum(list[float]) -> list[float]` sums over ranks (identity in one process).
    """
    total = 0.0
    for p in module.parameters():
        if not p.requires_grad:
            continue
        data = p.ds_tensor if zero3 and hasattr(p, "ds_tensor") else p.detach()
        total += float(torch.linalg.vector_norm(data, dtype=torch.float64)) ** 2  # float64: 1e30 weights stay finite
    if zero3:
        total = reduce_sum([total])[0]
    return math.sqrt(total) if math.isfinite(total) else total
