"""Curriculum Temperature KD (Li et al. 2023), global-temperature variant.

One learnable temperature T = t_min + (t_max - t_min) * sigmoid(theta) is trained ADVERSARIALLY: it
reaches theta through a gradient-reversal layer scaled by lambda, so the optimizer that minimises the
distillation loss for the student raises it for the temperature. lambda grows from lambda_min to
lambda_max with a cosine curriculum over the first `curriculum_fraction` of training.
    loss = T^2 * KL(softmax(z_T / T) || softmax(z_S / T))
The trainer must hand `loss.parameters()` to the optimizer (theta is the only one).
Defaults follow the authors' code: theta starts at 1 (T ~ 15.6), T in [1, 21].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import divergences as D
from .base import DistillationLoss, _check_step
from .params import check_range


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by -scale backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


class CurriculumTemperatureKD(DistillationLoss):
    name = "ctkd"

    def __init__(
        self,
        t_min: float = 1.0,
        t_max: float = 21.0,
        init_logit: float = 1.0,
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
        curriculum_fraction: float = 1.0,
        ce_weight: float = 0.0,
    ):
        super().__init__(ce_weight)
        self.t_min = check_range(self.name, "t_min", t_min, 0.0, math.inf, low_open=True, high_open=True)
        self.t_max = check_range(self.name, "t_max", t_max, self.t_min, math.inf, low_open=True, high_open=True)
        self.lambda_min = check_range(self.name, "lambda_min", lambda_min, 0.0, math.inf, high_open=True)
        self.lambda_max = check_range(self.name, "lambda_max", lambda_max, self.lambda_min, math.inf, high_open=True)
        self.curriculum_fraction = check_range(
            self.name, "curriculum_fraction", curriculum_fraction, 0.0, 1.0, low_open=True
        )
        init_logit = check_range(self.name, "init_logit", init_logit, -math.inf, math.inf, low_open=True, high_open=True)
        # shape [1], not a 0-dim scalar: DeepSpeed's engine views every parameter as bytes to broadcast it,
        # which a 0-dim tensor cannot do ("self.dim() cannot be 0 to view Float as Byte")
        self.temperature_logit = nn.Parameter(torch.tensor([init_logit], dtype=torch.float32))
        self.grl_lambda = self.lambda_min

    def temperature(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One-element tensor; its gradient to `temperature_logit` is reversed and scaled by lambda."""
        theta = GradientReversal.apply(self.temperature_logit.to(dtype), self.grl_lambda)
        return self.t_min + (self.t_max - self.t_min) * torch.sigmoid(theta)

    def divergence(self, student_logits, teacher_logits, labels):
        temp = self.temperature(student_logits.dtype)
        logq = torch.log_softmax(student_logits / temp, -1)
        logp = torch.log_softmax(teacher_logits / temp, -1)
        return temp**2 * D.kl(logp, logq)

    def update(self, step_loss: float, step: int, total_steps: int) -> None:
        _check_step(step, total_steps)
        progress = min(step / (self.curriculum_fraction * total_steps), 1.0)
        span = self.lambda_max - self.lambda_min
        self.grl_lambda = self.lambda_min + 0.5 * span * (1.0 + math.cos(math.pi * (1.0 + progress)))

    def schedule_state(self):
        return {"grl_lambda": self.grl_lambda}

    def load_schedule_state(self, state):
        state = dict(state)
        self.grl_lambda = float(state.pop("grl_lambda"))
        super().load_schedule_state(state)
