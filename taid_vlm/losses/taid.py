"""TAID: KL(p_t || q_S) with p_t = softmax((1 - t) * stopgrad(z_S) + t * z_T) (Shing et al., ICLR 2025).

The target interpolates in LOGIT space between the detached student and the teacher, so early in
training the student chases a target close to itself and the teacher's weight t grows with the
schedule (schedule.py). The value reported is the divergence itself: zero when student == teacher.
"""

from __future__ import annotations

import torch

from . import divergences as D
from .base import DistillationLoss, _check_step
from .closed_form import forward_kl_and_grad
from .schedule import TAIDSchedule


class TAIDLoss(DistillationLoss):
    name = "taid"

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        ce_weight: float = 0.0,
        adaptive: bool = True,
    ):
        super().__init__(ce_weight)
        self.schedule = TAIDSchedule(t_start=t_start, t_end=t_end, alpha=alpha, beta=beta, adaptive=adaptive)
        if not adaptive:
            self.name = "taid_linear"

    @property
    def t(self) -> float:
        return self.schedule.t

    def divergence(self, student_logits, teacher_logits, labels):
        logq = torch.log_softmax(student_logits, -1)
        target_logits = D.interpolate_logits(student_logits.detach(), teacher_logits, self.schedule.t)
        return D.kl(torch.log_softmax(target_logits, -1), logq)

    def closed_form(self, student_logits, teacher_logits, labels, scratch=None):
        """(values, d/d student_logits) for the chunked path; overwrites both buffers."""
        t = self.schedule.t
        target = teacher_logits.mul_(t) if t > 0 else teacher_logits.zero_()  # 0 * -inf would be NaN
        return forward_kl_and_grad(student_logits, target, labels, self.ce_weight, student_weight_in_target=1.0 - t,
                                   scratch=scratch)

    def update(self, step_loss: float, step: int, total_steps: int) -> None:
        _check_step(step, total_steps)
        self.schedule.update(step_loss, step, total_steps)

    def schedule_state(self):
        return self.schedule.state_dict()

    def load_schedule_state(self, state):
        state = dict(state)
        self.schedule.load_state_dict({k: state.pop(k) for k in ("t", "momentum", "prev_loss") if k in state})
        super().load_schedule_state(state)

    def extra_repr(self) -> str:
        s = self.schedule
        return f"t={s.t:.4f}, t_start={s.t_start}, t_end={s.t_end}, alpha={s.alpha}, beta={s.beta}, adaptive={s.adaptive}"


class TAIDLinearLoss(TAIDLoss):
    """TAID with the linear schedule only (the paper's ablation without the adaptive update)."""

    name = "taid_linear"

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, ce_weight: float = 0.0):
        super().__init__(t_start=t_start, t_end=t_end, ce_weight=ce_weight, adaptive=False)
