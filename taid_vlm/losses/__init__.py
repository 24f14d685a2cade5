"""Distillation losses on per-token logits, by name.

    from taid_vlm.losses import build_loss, LOSS_NAMES
    loss_fn = build_loss("taid", t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99)
    value = loss_fn(student_logits, teacher_logits, mask, labels=None)   # [N,V], [N,V], [N] -> scalar
    loss_fn.t                                      # TAID's interpolation coefficient (None for others)
    loss_fn.update(step_loss, step, total_steps)   # once per optimizer step, with the globally averaged loss
    loss_fn.state_dict(); loss_fn.load_state_dict(sd)  # parameters + "_extra_state": {t, momentum, prev_loss}
    value = loss_fn.fused(student_hidden, student_weight, OnlineTeacher(h_t, w_t), mask,
                          labels=None, chunk_size=None)   # same value & gradients, chunked over tokens; the teacher
                          # also LogitsTeacher(logits) / CachedTopKTeacher(ids, logprobs, log_tail): teacher_source.py
    loss_fn.needs_teacher; loss_needs_teacher("ce")  # False for SFT

Every loss reports the divergence itself (0 when student == teacher; `ce` is the exception), as the
mean over masked-in tokens, plus `ce_weight * cross-entropy(labels)` when ce_weight > 0. Banned
vocabulary entries (-inf logits) never produce NaN. CTKD has a learnable temperature: optimise
`loss_fn.parameters()` together with the student.
"""

from .base import DistillationLoss
from .registry import LOSS_NAMES, build_loss, loss_needs_teacher, loss_parameters
from .teacher_source import CachedTopKTeacher, LogitsTeacher, OnlineTeacher, TeacherSource

__all__ = ["DistillationLoss", "LOSS_NAMES", "build_loss", "loss_needs_teacher", "loss_parameters",
           "TeacherSource", "OnlineTeacher", "LogitsTeacher", "CachedTopKTeacher"]
