"""The module DeepSpeed trains: the student plus the distillation loss, as one nn.Module.

Holding the loss inside makes learnable loss parameters (CTKD's temperature) part of what the engine
optimizes and checkpoints, and lets ZeRO-3 gather the student's lm_head weight for the chunked loss:
the weight is used outside its own module's forward, so it is registered as an external parameter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from taid_vlm.losses import DistillationLoss, TeacherSource


def hidden_at(model, inputs: dict) -> torch.Tensor:
    """Final hidden states [K, H] at the positions that predict the supervised tokens."""
    hidden = model.hidden_states(
        inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"), inputs.get("position_ids")
    )
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs["loss_positions"])


class DistillationObjective(nn.Module):
    def __init__(self, student: nn.Module, loss_fn: DistillationLoss, vocab_size: int, chunk_size: Optional[int] = None):
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn
        self.vocab_size = vocab_size  # rows shared with the teacher (padding rows beyond it are ignored)
        self.chunk_size = chunk_size
        weight = student.output_weight()
        if isinstance(weight, nn.Parameter):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    def forward(self, student_inputs: dict, teacher: Optional[TeacherSource] = None) -> torch.Tensor:
        """The loss of one micro-batch; ``teacher``: rows paired with ``student_inputs["loss_targets"]``."""
        h_s = hidden_at(self.student, student_inputs)
        w_s = self.student.output_weight()[: self.vocab_size]
        return self.loss_fn.fused(h_s, w_s, mask=None, labels=student_inputs["loss_targets"],
                                  chunk_size=self.chunk_size, teacher=teacher)
