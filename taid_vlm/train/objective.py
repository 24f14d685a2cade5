"""The module DeepSpeed trains: the student plus the distillation loss, as one nn.Module.

Holding the loss inside makes learnable loss parameters (CTKD's temperature) part of what the engine
optimizes and checkpoints, and lets ZeRO-3 gather the student's lm_head weight for the chunked loss:
the weight is used outside its own module's forward, so it is registered as an external parameter.

Normalisation (one result whatever the world size): the loss of an optimizer step is the mean over
ALL its supervised tokens (every micro-batch, every rank). Each micro-batch's loss is its token sum
divided by ``step_denominator`` = (global token count of the step) / (world_size * grad_accum) and
goes to ``engine.backward(loss)``: DeepSpeed divides it by grad_accum and averages the gradients over
the ranks, so the accumulated gradient is exactly that of the global mean. ``step_loss`` turns the
micro-batch values back into that mean (TAID's J). (Not ``backward(..., scale_wrt_gas=False)`` with
the undivided count: DeepSpeed 0.19.8 still divides by grad_accum under ZeRO-0 when the module's
output tensor is itself the loss, through its output backward hook, and not under ZeRO-3.)
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from taid_vlm.losses import DistillationLoss, TeacherSource

from .launch_env import all_reduce_sum


def hidden_at(model, inputs: dict) -> torch.Tensor:
    """Final hidden states [K, H] at the positions that predict the supervised tokens."""
    hidden = model.hidden_states(
        inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"), inputs.get("position_ids")
    )
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs["loss_positions"])


def sparse_tied_embedding_grad(student, zero_stage: int) -> bool:
    """When the student's input embedding IS its lm_head weight, make the embedding's backward sparse.

    The chunked loss returns a dense [V, H] gradient for the lm_head weight in every micro-batch; a dense
    embedding backward would zero-fill a second [V, H] tensor (148 MB at V = 151,936, H = 256 in fp32;
    467 MB for a 1.5B student in bf16) and scatter the batch's few hundred rows into it, before autograd
    sums the two. A sparse one hands over only those rows, which autograd adds in place into the dense
    lm_head gradient: W.grad stays one dense tensor (AdamW and DeepSpeed see no sparse gradient) and the
    peak holds one [V, H] gradient instead of two. Untied weights are left alone (their .grad would be
    sparse), and so is ZeRO-3, whose partitioned gradient hooks are not checked with it. Returns whether
    it was switched on."""
    weight = student.output_weight()
    if zero_stage >= 3 or not isinstance(weight, nn.Parameter) or not weight.requires_grad:
        return False
    tied = [m for m in student.modules() if isinstance(m, nn.Embedding) and m.weight is weight]
    for embedding in tied:
        embedding.sparse = True
    return bool(tied)


class DistillationObjective(nn.Module):
    def __init__(self, student: nn.Module, loss_fn: DistillationLoss, vocab_size: int, chunk_size: Optional[int] = None,
                 zero_stage: int = 0):
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn
        self.vocab_size = vocab_size  # rows shared with the teacher (padding rows beyond it are ignored)
        self.chunk_size = chunk_size
        weight = student.output_weight()
        if isinstance(weight, nn.Parameter):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)
        self.sparse_embedding_grad = sparse_tied_embedding_grad(student, zero_stage)

    def forward(self, student_inputs: dict, teacher: Optional[TeacherSource] = None,
                denominator: Optional[float] = None) -> torch.Tensor:
        """The loss of one micro-batch; ``teacher``: rows paired with ``student_inputs["loss_targets"]``. Its
        sum over supervised tokens divided by ``denominator`` (step_denominator), or their mean when None."""
        h_s = hidden_at(self.student, student_inputs)
        w_s = self.student.output_weight()
        if w_s.shape[0] != self.vocab_size:  # a slice, even a full one, costs a zero-filled [V, H] in backward
            w_s = w_s[: self.vocab_size]
        return self.loss_fn.fused(h_s, w_s, mask=None, labels=student_inputs["loss_targets"],
                                  chunk_size=self.chunk_size, teacher=teacher, denominator=denominator)


def step_denominator(batches: Iterable[dict], world_size: int, grad_accum: int, device: torch.device) -> float:
    """(supervised tokens of this optimizer step over all ranks) / (world_size * grad_accum); every rank
    calls it with its micro-batches of the step, before the first forward (the gradients scale by it)."""
    local = sum(int(b["student"]["loss_targets"].numel()) for b in batches)
    (total,) = all_reduce_sum([float(local)], device)
    return max(total, 1.0) / (world_size * grad_accum)


def step_loss(micro_values: Iterable[float], world_size: int, grad_accum: int, device: torch.device) -> float:
    """The mean over all the step's supervised tokens, from this rank's micro-batch loss values."""
    (total,) = all_reduce_sum([float(sum(micro_values))], device)
    return total / (world_size * grad_accum)
