"""Divergences that compare the two distributions directly: forward/reverse KL, TVD, generalized JSD,
the skew KLs of DistiLLM (Ko et al. 2024), and plain cross-entropy (SFT)."""

from __future__ import annotations

import torch

from . import divergences as D
from .base import DistillationLoss, label_cross_entropy
from .closed_form import forward_kl_and_grad, reverse_kl_and_grad
from .params import check_range


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    return torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)


class ForwardKL(DistillationLoss):
    """KL(p_T || q_S): mode covering."""

    name = "fkl"

    def divergence(self, student_logits, teacher_logits, labels):
        logq, logp = _log_probs(student_logits, teacher_logits)
        return D.kl(logp, logq)

    def closed_form(self, student_logits, teacher_logits, labels, scratch=None):
        """(values, d/d student_logits) for the chunked path; overwrites both buffers."""
        return forward_kl_and_grad(student_logits, teacher_logits, labels, self.ce_weight, scratch=scratch)


class ReverseKL(DistillationLoss):
    """KL(q_S || p_T): mode seeking.

    Tokens the teacher bans (logit -inf, p_T = 0) where the student still has mass (q_S > 0) make the
    exact value +inf. Convention, as in the reference code (DistiLLM's / TAID's ``reverse_kl`` mask
    ``isinf(teacher_logits)``): such terms are left out of the sum, so value and gradient stay finite
    and only the tokens the teacher allows are fitted. Then the value is
    ``sum_{v: p_v > 0} q_v (log q_v - log p_v)``, which equals KL(q_S || p_T) when nothing is banned.
    """

    name = "rkl"

    def divergence(self, student_logits, teacher_logits, labels):
        logq, logp = _log_probs(student_logits, teacher_logits)
        return D.kl_over_allowed(logq, logp)

    def closed_form(self, student_logits, teacher_logits, labels, scratch=None):
        """(values, d/d student_logits) for the chunked path; overwrites both buffers."""
        return reverse_kl_and_grad(student_logits, teacher_logits, labels, self.ce_weight, scratch=scratch)


class TotalVariation(DistillationLoss):
    """0.5 * sum |p_T - q_S| (Wen et al. 2023)."""

    name = "tvd"

    def divergence(self, student_logits, teacher_logits, labels):
        logq, logp = _log_probs(student_logits, teacher_logits)
        return D.total_variation(logp, logq)


class GeneralizedJSD(DistillationLoss):
    """beta * KL(p_T || m) + (1 - beta) * KL(q_S || m), m = beta * p_T + (1 - beta) * q_S (GKD)."""

    name = "gjsd"

    def __init__(self, beta: float = 0.1, ce_weight: float = 0.0):
        super().__init__(ce_weight)
        self.beta = check_range(self.name, "beta", beta, 0.0, 1.0, low_open=True, high_open=True)

    def divergence(self, student_logits, teacher_logits, labels):
        logq, logp = _log_probs(student_logits, teacher_logits)
        logm = D.log_mixture(logp, logq, self.beta)
        return self.beta * D.kl(logp, logm) + (1.0 - self.beta) * D.kl(logq, logm)


class SkewForwardKL(DistillationLoss):
    """KL(p_T || a * p_T + (1 - a) * q_S) (DistiLLM)."""

    name = "sfkl"

    def __init__(self, skew: float = 0.1, ce_weight: float = 0.0):
        super().__init__(ce_weight)
        self.skew = check_range(self.name, "skew", skew, 0.0, 1.0, high_open=True)

    def divergence(self, student_logits, teacher_logits, labels):
        logq, logp = _log_probs(student_logits, teacher_logits)
        return D.kl(logp, D.log_mixture(logp, logq, self.skew))


class SkewReverseKL(DistillationLoss):
    """KL(q_S || (1 - a) * p_T + a * q_S) (DistiLLM)."""

    name = "srkl"

    def __init__(self, skew: float = 0.1, ce_weight: float = 0.0):
        super().__init__(ce_weight)
        self.skew = check_range(self.name, "skew", skew, 0.0, 1.0, high_open=True)

    def divergence(self, student_logits, teacher_logits, labels):
        logq, logp = _log_probs(student_logits, teacher_logits)
        return D.kl(logq, D.log_mixture(logp, logq, 1.0 - self.skew))


class CrossEntropy(DistillationLoss):
    """Supervised fine-tuning on the ground-truth tokens; the teacher is not used."""

    name = "ce"
    needs_teacher = False
    needs_labels = True

    def divergence(self, student_logits, teacher_logits, labels):
        return label_cross_entropy(student_logits, labels)
