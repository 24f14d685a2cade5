"""Small helpers over torch.distributed that work unchanged in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def mean_over_ranks(value: float, group=None) -> float:
    """Average a Python scalar over all ranks (identity without an initialised process group).

    Used for the TAID schedule: every rank must feed the same step loss so that every rank holds the
    same t. The tensor lives on the GPU under NCCL, on the CPU otherwise.
    """
    if world_size() == 1:
        return float(value)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    buf = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return float(buf.item()) / dist.get_world_size(group)
