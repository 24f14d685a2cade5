"""Decoupled Knowledge Distillation (Zhao et al. 2022), applied per token with the label as target class.

    TCKD = KL(b_T || b_S),   b = [p(target), 1 - p(target)]                   (target vs. the rest)
    NCKD = KL(p_T(. | not target) || q_S(. | not target))                      (among the non-targets)
    loss = temperature^2 * (alpha * TCKD + beta * NCKD), all at the given temperature.
The non-target distribution masks the target logit with -inf (exact; the original code subtracts 1000).
Defaults are the paper's ImageNet setting (alpha 1, beta 0.5, temperature 1).

A teacher row that allows only the target (every other logit -inf) has no non-target distribution:
its NCKD term is 0 (nothing to match among the non-targets), with a zero gradient, instead of the NaN
of log_softmax over an all -inf row; TCKD still pulls the student's target mass towards 1.
"""

from __future__ import annotations

import math

import torch

from . import divergences as D
from .base import DistillationLoss
from .params import check_range


def _binary_and_rest(logits: torch.Tensor, target: torch.Tensor):
    """log [p(target), 1 - p(target)] as [N, 2], and log-probs of the non-target classes [N, V]."""
    is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, target.unsqueeze(-1), True)
    rest_logits = logits.masked_fill(is_target, -math.inf)
    log_total = torch.logsumexp(logits, -1, keepdim=True)
    log_p_target = logits.gather(-1, target.unsqueeze(-1)) - log_total
    log_p_rest = torch.logsumexp(rest_logits, -1, keepdim=True) - log_total
    return torch.cat([log_p_target, log_p_rest], -1), torch.log_softmax(rest_logits, -1)


class DecoupledKD(DistillationLoss):
    name = "dkd"
    needs_labels = True

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, temperature: float = 1.0, ce_weight: float = 0.0):
        super().__init__(ce_weight)
        self.alpha = check_range(self.name, "alpha", alpha, 0.0, math.inf)
        self.beta = check_range(self.name, "beta", beta, 0.0, math.inf)
        self.temperature = check_range(self.name, "temperature", temperature, 0.0, math.inf, low_open=True, high_open=True)

    def divergence(self, student_logits, teacher_logits, labels):
        target = labels.long()
        b_s, rest_s = _binary_and_rest(student_logits / self.temperature, target)
        b_t, rest_t = _binary_and_rest(teacher_logits / self.temperature, target)
        tckd = D.kl(b_t, b_s)
        # double where: rows where the teacher has no non-target mass get a harmless stand-in first
        has_rest = b_t[:, 1] > -math.inf
        rest_t = torch.where(has_rest.unsqueeze(-1), rest_t, rest_s.detach())
        nckd = torch.where(has_rest, D.kl(rest_t, rest_s), 0.0)
        return self.temperature**2 * (self.alpha * tckd + self.beta * nckd)
