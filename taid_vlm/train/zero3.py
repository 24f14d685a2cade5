"""Reading parameters that ZeRO-3 may have partitioned."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def gathered(*params: torch.Tensor) -> Iterator[None]:
    """Inside the block the parameters hold their full data: gathered on every rank when ZeRO-3
    partitioned them (they carry a ds_id), untouched otherwise. For reading only: changes are not
    written back. Under ZeRO-3 every rank must enter the block (the gather is collective)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
