"""What a run is about to do, logged once at start: model sizes, world size, tokens per step, data.

A 1.4 GB student where a 10 MB one was meant, or a data folder with 12 samples, shows in the first
lines of the log instead of after hours.
"""

from __future__ import annotations

from typing import Optional

import torch

from .preflight import all_shards


def parameter_counts(module: Optional[torch.nn.Module]) -> Optional[dict]:
    """Total and trainable parameter counts (ZeRO-3 partitioned parameters count their full size)."""
    if module is None:
        return None
    total = trainable = 0
    for p in module.parameters():
        n = int(getattr(p, "ds_numel", 0)) or p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return {"total": total, "trainable": trainable}


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def summary_lines(teacher, student, world: int, micro_batch: int, grad_accum: int, max_length: int,
                  shards: dict[str, list[str]], samples: dict[str, int], teacher_cache: Optional[str] = None,
                  device: str = "") -> list[str]:
    """``samples``: the raw samples of each of ``shards``' sets, as its loader counted them from the shard
    index (Loader.raw_samples; no shard or index is read again here); a set without one: count unknown."""
    lines = []
    for role, module in (("student", student), ("teacher", teacher)):
        counts = parameter_counts(module)
        if counts is not None:
            lines.append(f"{role}: {_millions(counts['total'])} parameters, {_millions(counts['trainable'])} trainable")
    if teacher is None and teacher_cache:
        lines.append(f"teacher: top-k cache {teacher_cache} (no teacher model built)")
    samples_per_step = micro_batch * grad_accum * world
    on = f" on {device}" if device else ""  # the device, said once (DeepSpeed's own CPU warning is silenced)
    lines.append(f"world size {world}{on}; {samples_per_step} samples per optimizer step (micro-batch {micro_batch} x "
                 f"grad_accum {grad_accum} x {world} ranks), at most {samples_per_step * max_length} tokens "
                 f"(max_length {max_length})")
    for name, listed in shards.items():
        found = all_shards(listed)  # a weighted mixture's sources, one after another
        n = samples.get(name)
        where = found[0] if len(found) == 1 else f"{found[0]} .. {found[-1]}"
        counted = f"{n} samples" if n is not None else "sample count unknown"
        lines.append(f"data.{name}: {len(found)} shard{'s' if len(found) != 1 else ''} ({where}), {counted}")
    return lines
