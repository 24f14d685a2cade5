"""Adaptive KL (Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for LLMs").

Per token, the teacher's vocabulary is split into a head (the most likely tokens up to cumulative mass
mu; the top token always belongs to it) and a tail. The student-teacher gap |p - q| summed over each part
weighs forward KL (which fits the head first) against reverse KL (which fits the tail first):
    loss = g_head / (g_head + g_tail) * FKL + g_tail / (g_head + g_tail) * RKL
The weights use the detached student, as in the authors' code. The reverse-KL part leaves out the
tokens the teacher bans (-inf logits) like ``rkl`` does (see ReverseKL): value and gradient stay finite.
"""

from __future__ import annotations

import torch

from . import divergences as D
from .base import DistillationLoss
from .params import check_range


def head_tail_weights(logp_teacher: torch.Tensor, logq_student: torch.Tensor, mu: float):
    """Return (w_head, w_tail), each [N], summing to one (0.5 each where the two agree exactly)."""
    p = logp_teacher.exp()
    q = logq_student.detach().exp()
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    gap = (p_sorted - q.gather(-1, order)).abs()
    tail = p_sorted.cumsum(-1) > mu
    tail[..., 0] = False
    g_tail = (gap * tail).sum(-1)
    g_head = (gap * ~tail).sum(-1)
    total = g_head + g_tail
    safe_total = torch.where(total > 0, total, 1.0)
    w_head = torch.where(total > 0, g_head / safe_total, 0.5)
    return w_head, 1.0 - w_head


class AdaptiveKL(DistillationLoss):
    name = "akl"

    def __init__(self, mu: float = 0.5, ce_weight: float = 0.0):
        super().__init__(ce_weight)
        self.mu = check_range(self.name, "mu", mu, 0.0, 1.0, low_open=True, high_open=True)

    def divergence(self, student_logits, teacher_logits, labels):
        logq = torch.log_softmax(student_logits, -1)
        logp = torch.log_softmax(teacher_logits, -1)
        w_head, w_tail = head_tail_weights(logp, logq, self.mu)
        return w_head * D.kl(logp, logq) + w_tail * D.kl_over_allowed(logq, logp)
