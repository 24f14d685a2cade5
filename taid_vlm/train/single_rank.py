"""Backward without DeepSpeed's gradient all-reduce where it is an identity: one process, ZeRO-0.

At ZeRO-0 DeepSpeed's engine.backward ends with buffered_allreduce_fallback: it flattens every gradient
into one new buffer (torch.cat: a second copy of all gradients), all-reduces it over the process group
and copies the result back, once per micro-batch. Over a one-process group that is three passes over the
gradients and a full-size transient for nothing. DeepSpeed's own `engine.no_sync()` skips that reduction
(its documented use: gradient accumulation without communication); step() stays outside it. ZeRO-1/2/3
move gradients into their partitions inside that reduction, so they keep it.
"""

from __future__ import annotations

import contextlib


def backward_reduction(engine, world_size: int):
    """The context to run engine.backward in: engine.no_sync() when the reduction is an identity."""
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        return engine.no_sync()
    return contextlib.nullcontext()
