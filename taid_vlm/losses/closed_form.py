"""Closed-form value and d/d(student logits) for the losses the chunked path runs most (TAID, FKL, RKL).

The chunked path needs, per chunk, the per-token values and the gradient w.r.t. the student logits.
Autograd gives both for any loss but keeps ~7 [C, V] buffers alive; these closed forms work in place on
the two logit buffers plus one more, so chunks can be larger (fewer passes over the [V, H] weight) for
the same memory. Each is checked against the autograd path of the same loss in the tests.

    FKL / TAID: value = sum_v p_v (log p_v - log q_v),  grad = q - p    (p: teacher or TAID target)
    RKL:        value = sum_v q_v (log q_v - log p_v),  grad = q * (log q - log p - value)
    + ce_weight * CE: value += -log q_y,  grad += ce_weight * (q - onehot(y))
Both input buffers are overwritten.
"""

from __future__ import annotations

from typing import Optional

import torch


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    return x.sub_(torch.logsumexp(x, -1, keepdim=True))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nv,nv->n", a, b)  # a batched matmul: no [C, V] temporary


def forward_kl_and_grad(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    ce_weight: float,
    student_weight_in_target: float = 0.0,
):
    """KL(p || q) with p = softmax(target_logits + student_weight_in_target * log q) and q = softmax(student).

    `student_weight_in_target` = 1 - t gives TAID's target: softmax is shift-invariant per row, so
    (1 - t) * log q stands in for (1 - t) * z_student.
    """
    logq = _log_softmax_(student_logits)
    if student_weight_in_target:
        target_logits.add_(logq, alpha=student_weight_in_target)
    logp = _log_softmax_(target_logits)
    p = logp.exp()
    no_mass = p == 0
    diff = logp.sub_(logq).masked_fill_(no_mass, 0.0)
    values = _rowdot(p, diff)
    del diff, logp
    y_logq = logq.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) if ce_weight else None
    grad = logq.exp_()
    if ce_weight:
        values = values - ce_weight * y_logq
        grad.mul_(1.0 + ce_weight).sub_(p)
        grad.scatter_add_(-1, labels.long().unsqueeze(-1), grad.new_full((grad.shape[0], 1), -ce_weight))
    else:
        grad.sub_(p)
    return values, grad


def reverse_kl_and_grad(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor], ce_weight: float
):
    logq = _log_softmax_(student_logits)
    logp = _log_softmax_(teacher_logits)
    q = logq.exp()
    diff = torch.sub(logq, logp, out=logp).masked_fill_(q == 0, 0.0)  # log q - log p, 0 off q's support
    values = _rowdot(q, diff)
    grad = diff.sub_(values.unsqueeze(-1)).mul_(q)
    if ce_weight:
        values = values - ce_weight * logq.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
        grad.add_(q, alpha=ce_weight)
        grad.scatter_add_(-1, labels.long().unsqueeze(-1), grad.new_full((grad.shape[0], 1), -ce_weight))
    return values, grad
