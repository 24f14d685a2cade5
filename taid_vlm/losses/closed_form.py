"""Closed-form value and d/d(student logits) for the losses the chunked path runs most (TAID, FKL, RKL).

The chunked path needs, per chunk, the per-token values and the gradient w.r.t. the student logits.
Autograd gives both for any loss but keeps ~7 [C, V] buffers alive and allocates new ones per chunk;
these closed forms work in place on the two logit buffers plus one scratch buffer, so chunks can be
larger (fewer passes over the [V, H] weight) for the same memory, and no [C, V] memory is allocated
per chunk (on CPU, fresh large buffers cost page faults). Each is checked against the autograd path
of the same loss in the tests.

    FKL / TAID: value = sum_v p_v (log p_v - log q_v),  grad = q - p    (p: teacher or TAID target)
    RKL:        value = sum_v q_v (log q_v - log p_v),  grad = q * (log q - log p - value)
                (entries the teacher bans, log p = -inf, are left out as in ReverseKL: with a = 1 on the
                allowed entries and 0 elsewhere, d = a * (log q - log p), value = sum_v q_v d_v,
                grad = q * (d + a - value - sum_v q_v a_v))
    + ce_weight * CE: value += -log q_y,  grad += ce_weight * (q - onehot(y))

Preconditions (true in the chunked path, where student logits come from a matmul): student logits are
finite; teacher logits may hold -inf (banned entries). Both logit buffers are overwritten; the
returned gradient aliases the student buffer.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch


def _log_softmax_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """x <- log_softmax(x) in place, using `scratch` (same shape) instead of a fresh temporary."""
    x.sub_(x.amax(-1, keepdim=True))
    lse = torch.exp(x, out=scratch).sum(-1, keepdim=True).log_()
    return x.sub_(lse)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nv,nv->n", a, b)  # a batched matmul: no [C, V] temporary


def _label_log_prob(logq, labels):
    return logq.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def _add_label_ce(values, grad, probs, y_logq, labels, ce_weight):
    """values += ce_weight * (-log q_y); grad += ce_weight * (q - onehot(y))."""
    index = labels.long().unsqueeze(-1)
    values = values - ce_weight * y_logq
    grad.add_(probs, alpha=ce_weight)
    grad.scatter_add_(-1, index, grad.new_full((grad.shape[0], 1), -ce_weight))
    return values


def _use_triton(student_logits: torch.Tensor, target_logits: torch.Tensor) -> bool:
    """With TAID_VLM_TRITON=1, CUDA buffers with contiguous rows go to the fused Triton kernel
    (triton_kl.py). Opt-in until its speed and results are measured on a GPU (benchmarks/gpu_suite.sh
    runs both): it is checked only under Triton's CPU interpreter so far. Without Triton: torch."""
    if not (student_logits.is_cuda and target_logits.is_cuda) or os.environ.get("TAID_VLM_TRITON", "0") != "1":
        return False
    if student_logits.stride(-1) != 1 or target_logits.stride(-1) != 1:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def forward_kl_and_grad(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    ce_weight: float,
    student_weight_in_target: float = 0.0,
    scratch: Optional[torch.Tensor] = None,
):
    """KL(p || q) with p = softmax(target_logits + student_weight_in_target * log q) and q = softmax(student).

    `student_weight_in_target` = 1 - t gives TAID's target: softmax is shift-invariant per row, so
    (1 - t) * log q stands in for (1 - t) * z_student.
    """
    if _use_triton(student_logits, target_logits):
        from .triton_kl import forward_kl_rows

        return forward_kl_rows(student_logits, target_logits, labels, ce_weight, student_weight_in_target)
    scratch = torch.empty_like(student_logits) if scratch is None else scratch
    logq = _log_softmax_(student_logits, scratch)
    if student_weight_in_target:
        target_logits.add_(logq, alpha=student_weight_in_target)
    logp = _log_softmax_(target_logits, scratch)
    p = torch.exp(logp, out=scratch)
    # log p = -inf only where p = 0; clamping keeps p * (log p - log q) = 0 there without a mask.
    diff = logp.clamp_(min=torch.finfo(logp.dtype).min).sub_(logq)
    values = _rowdot(p, diff)
    y_logq = logq.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) if ce_weight else None
    grad = logq.exp_()  # q, in the student buffer
    if ce_weight:
        values = values - ce_weight * y_logq
        grad.mul_(1.0 + ce_weight).sub_(p)
        grad.scatter_add_(-1, labels.long().unsqueeze(-1), grad.new_full((grad.shape[0], 1), -ce_weight))
    else:
        grad.sub_(p)
    return values, grad


def reverse_kl_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    ce_weight: float,
    scratch: Optional[torch.Tensor] = None,
):
    scratch = torch.empty_like(student_logits) if scratch is None else scratch
    logq = _log_softmax_(student_logits, scratch)
    logp = _log_softmax_(teacher_logits, scratch)
    q = torch.exp(logq, out=scratch)
    y_logq = _label_log_prob(logq, labels) if ce_weight else None  # before logq's buffer is reused
    diff = torch.sub(logq, logp, out=logp)  # +inf exactly where the teacher bans an entry
    # No branch (and no host sync) for the banned case: these are a few elementwise passes next to
    # the [C, H] x [H, V] matmul; with nothing banned a = 1 and the result is q * (d - value).
    allowed = torch.ne(diff, math.inf, out=logq)  # a as 1.0 / 0.0, in the student buffer (logq is spent)
    diff.nan_to_num_(posinf=0.0)  # d = a * (log q - log p)
    values = _rowdot(q, diff)
    shift = values + _rowdot(q, allowed)
    grad = diff.add_(allowed).sub_(shift.unsqueeze(-1)).mul_(q)
    if ce_weight:
        values = _add_label_ce(values, grad, q, y_logq, labels, ce_weight)
    return values, grad
