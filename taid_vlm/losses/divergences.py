"""Per-token divergences between distributions given as log-probabilities over the last dimension.

Every function returns one value per row ([N, V] -> [N]) and is safe with banned vocabulary entries
(log-probability -inf): terms with zero mass contribute exactly 0 and their gradients are 0, never NaN.
The pattern is the "double where": the unsafe branch is replaced before any arithmetic that could
produce inf - inf or 0 * inf, because torch.where alone still back-propagates NaN from the other branch.
"""

from __future__ import annotations

import math

import torch


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), with 0 * log(0 / x) = 0."""
    p = logp.exp()
    support = p > 0
    log_ratio = torch.where(support, logp - torch.where(support, logq, 0.0), 0.0)
    return (p * log_ratio).sum(-1)


def kl_over_allowed(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed only over the entries that q allows (log q > -inf).

    Where q bans an entry that p allows, KL(p || q) is +inf mathematically and its gradient is NaN.
    Reverse KL (p = student, q = teacher) meets that whenever the teacher bans tokens (-inf logits) the
    student does not; the reference code of DistiLLM and TAID masks those terms out
    (``masked_fill(..., isinf(teacher_logits), 0)``), and so does this: the banned entries contribute
    nothing, to the value or the gradient. With no banned entry it equals ``kl``.
    """
    p = logp.exp()
    keep = (p > 0) & (logq > -math.inf)
    log_ratio = torch.where(keep, logp - torch.where(keep, logq, 0.0), 0.0)
    return (p * log_ratio).sum(-1)


def cross_entropy(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log q_v with 0 * log(x) = 0; same gradient in q as kl(p, q)."""
    p = logp.exp()
    return -(p * torch.where(p > 0, logq, 0.0)).sum(-1)


def total_variation(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """0.5 * sum_v |p_v - q_v|."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def log_mixture(logp: torch.Tensor, logq: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q), computed in log space so tiny probabilities keep precision."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {weight}")
    if weight == 0.0:
        return logq
    if weight == 1.0:
        return logp
    a = logp + math.log(weight)
    b = logq + math.log1p(-weight)
    top = torch.maximum(a, b)
    top = torch.where(torch.isfinite(top), top, 0.0)
    total = (a - top).exp() + (b - top).exp()
    positive = total > 0
    return torch.where(positive, top + torch.where(positive, total, 1.0).log(), -math.inf)


def interpolate_logits(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) * student + t * teacher, exact at the end points (no 0 * -inf there)."""
    if t == 0.0:
        return student
    if t == 1.0:
        return teacher
    return (1.0 - t) * student + t * teacher
