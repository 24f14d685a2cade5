"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""

from __future__ import annotations

import math

import torch

from taid_vlm.config import OptimConfig


def lr_factor(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Multiplier of the base LR for the update that follows `step` completed optimizer steps."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(total_steps - optim.warmup_steps, 1)
    progress = min(max(step - optim.warmup_steps, 0) / span, 1.0)
    if optim.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, optim: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, optim))


def apply_optim_config(scheduler: torch.optim.lr_scheduler.LambdaLR, optim: OptimConfig) -> list[str]:
    """After a resume: put this config's lr, betas, eps and weight decay on the optimizer and the schedule.

    Loading a checkpoint restores AdamW's param groups and the schedule's base LR as they were saved, so
    a run resumed with a new `optim.lr` would keep training at the old one, silently. The schedule's
    position (last_epoch) stays the checkpoint's; its shape (warmup, total steps) is already the new
    config's, since the lambda is never saved. Returns what changed, e.g. "optim.lr: 0.001 -> 0.00025".
    """
    wanted = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    groups = scheduler.optimizer.param_groups
    changes = []
    for key, value in wanted.items():
        old = scheduler.base_lrs[0] if key == "lr" else groups[0][key]
        old = tuple(old) if key == "betas" else old
        if old != value:
            changes.append(f"optim.{key}: {old} -> {value}")
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [optim.lr] * len(groups)
    for group in groups:
        group.update(betas=wanted["betas"], eps=optim.eps, weight_decay=optim.weight_decay,
                     initial_lr=optim.lr, lr=optim.lr * factor)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports (no public setter)
    return changes
