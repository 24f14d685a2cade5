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


def _parameter_offload(engine):
    """The ZeRO-3 parameter manager of a DeepSpeed engine (with or without an optimizer), else None."""
    if engine is None or engine.zero_optimization_stage() != 3 or engine.optimizer is None:
        return None
    return getattr(engine.optimizer, "parameter_offload", engine.optimizer)


@contextlib.contextmanager
def generation_ready(engine) -> Iterator[None]:
    """ZeRO-3: the engine's whole model gathered on every rank, and DeepSpeed's per-module fetch/release
    hooks taken off while it generates (ranks run different numbers of decoding steps, and the hooks'
    gathers are collectives); the hooks go back afterwards. TRL's unwrap_model_for_generation does the
    same (remove_hooks / add_hooks). Other stages: nothing to do. Every rank must enter it."""
    offload = _parameter_offload(engine)
    if offload is None:
        yield
        return
    import deepspeed

    params = list(offload.module.parameters())
    for p in params:
        p.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    finally:
        coordinator = getattr(offload, "param_coordinator", None)
        if coordinator is not None and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()  # its recorded module order saw no generation
        offload._register_deepspeed_module(offload.module)
