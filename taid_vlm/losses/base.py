"""The interface every distillation loss implements, and the masked-mean plumbing they share.

A loss is an nn.Module (CTKD has a learnable temperature) with one subclass hook, `divergence`, that
maps student and teacher logits of the supervised tokens to one divergence per token. Everything else
(`per_token`: the compute dtype and the optional cross-entropy mix; validation, masking, the chunked
lm_head path, schedule state) lives here once.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import divergences
from .chunked import chunked_lm_head_loss
from .inputs import check_mask_and_labels
from .teacher_source import TeacherSource


class DistillationLoss(nn.Module):
    """Base class. Call as ``loss(student_logits [N,V], teacher_logits [N,V], mask [N], labels=None)``.

    Returns the mean over tokens where ``mask`` is true of ``divergence + ce_weight * CE(labels)``;
    0.0 (with a graph, no NaN) when no token is masked in.
    """

    name: str = "base"
    needs_teacher: bool = True
    needs_labels: bool = False

    def __init__(self, ce_weight: float = 0.0):
        super().__init__()
        ce_weight = float(ce_weight)
        if not ce_weight >= 0.0:
            raise ValueError(f"{self.name}: ce_weight must be >= 0, got {ce_weight}")
        self.ce_weight = ce_weight

    # ---- subclass hook -------------------------------------------------------------------------
    def divergence(
        self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """[N, V] float logits (already in the compute dtype) -> [N] per-token divergence."""
        raise NotImplementedError

    # ---- shared machinery ----------------------------------------------------------------------
    def per_token(
        self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Per-token objective in float32 (float64 if the inputs are): divergence plus the CE mix."""
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        s = student_logits.to(dtype)
        t = teacher_logits.to(dtype) if teacher_logits is not None else None
        value = self.divergence(s, t, labels)
        if self.ce_weight > 0.0:
            value = value + self.ce_weight * label_cross_entropy(s, labels)
        return value

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: Optional[torch.Tensor],
        mask: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        mask = self._check_inputs(student_logits, teacher_logits, mask, labels)
        s = student_logits[mask]
        t = teacher_logits[mask] if teacher_logits is not None else None
        y = labels[mask] if labels is not None else None
        values = self.per_token(s, t, y)
        return values.sum() / max(int(values.shape[0]), 1)

    def fused(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher: Optional[TeacherSource] = None,
        mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
        denominator: Optional[float] = None,
    ) -> torch.Tensor:
        """Same value and gradients as ``self(h_s @ W_s.T, teacher logits, mask, labels)``, computed over
        chunks of tokens so the [N, V] logits never exist at once (chunked.py). ``teacher``: where the teacher
        rows come from, a TeacherSource (teacher_source.py: ``OnlineTeacher(h_t, W_t)``, ``LogitsTeacher``,
        ``CachedTopKTeacher``); None for a loss that does not use a teacher. ``denominator``: divide the sum
        over tokens by this instead of their number (a global token count, for a loss that is a mean over
        more tokens than this call sees)."""
        if teacher is not None and not isinstance(teacher, TeacherSource):
            raise TypeError(f"{self.name}: teacher must be a TeacherSource (OnlineTeacher(h_t, W_t), LogitsTeacher, "
                            f"CachedTopKTeacher), got {type(teacher).__name__}")
        return chunked_lm_head_loss(self, student_hidden, student_weight, teacher, mask, labels, chunk_size, denominator)

    # ---- optional fast path --------------------------------------------------------------------
    def closed_form(
        self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
        scratch: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token values [N], d(values)/d(student_logits) [N, V]) without autograd, in place in the two
        logit buffers (closed_form.py). Optional: a loss that overrides it gets the faster chunked path
        (used only when the loss has no learnable parameters); the tests check it against autograd."""
        raise NotImplementedError(f"{self.name}: no closed form")

    @property
    def has_closed_form(self) -> bool:
        return type(self).closed_form is not DistillationLoss.closed_form

    # ---- schedule hooks (no-ops unless the loss has a schedule) --------------------------------
    @property
    def t(self) -> Optional[float]:
        """Current TAID interpolation coefficient; None for losses without one."""
        return None

    def update(self, step_loss: float, step: int, total_steps: int) -> None:
        """Called once per optimizer step with the rank- and micro-batch-averaged loss."""
        _check_step(step, total_steps)

    def schedule_state(self) -> dict[str, Any]:
        return {}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        if state:
            raise KeyError(f"{self.name}: unexpected schedule state keys {sorted(state)}")

    # Schedule state rides in nn.Module's extra state, so it is saved with the loss's parameters both
    # when the loss is used alone (loss.state_dict()) and when it is a submodule of the trained model.
    def get_extra_state(self) -> dict[str, Any]:
        return self.schedule_state()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.load_schedule_state(dict(state))

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}" if self.ce_weight else ""

    # ---- validation ----------------------------------------------------------------------------
    def _check_inputs(self, student_logits, teacher_logits, mask, labels) -> torch.Tensor:
        if student_logits.dim() != 2:
            raise ValueError(f"{self.name}: student_logits must be [N, V], got shape {tuple(student_logits.shape)}")
        n, v = student_logits.shape
        if self.needs_teacher:
            if teacher_logits is None:
                raise ValueError(f"{self.name}: needs teacher_logits")
            if teacher_logits.dim() != 2 or teacher_logits.shape[0] != n:
                raise ValueError(
                    f"{self.name}: teacher_logits shape {tuple(teacher_logits.shape)} does not match "
                    f"student_logits shape {tuple(student_logits.shape)}"
                )
            if teacher_logits.shape[1] != v:
                raise ValueError(
                    f"{self.name}: vocabulary mismatch: student has {v} logits per token, teacher has "
                    f"{teacher_logits.shape[1]}; slice both to the shared tokenizer vocabulary first"
                )
        return check_mask_and_labels(self, n, v, mask, labels, student_logits.device)


def label_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log q(label) per token."""
    logq = torch.log_softmax(student_logits, dim=-1)
    return -logq.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def _check_step(step: int, total_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


__all__ = ["DistillationLoss", "divergences", "label_cross_entropy", "check_mask_and_labels"]
