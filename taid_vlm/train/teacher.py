"""The frozen teacher beside the student (a replicated copy per device, or ZeRO-3 sharded over ranks),
and the TeacherSource it gives for one batch."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from taid_vlm.losses import OnlineTeacher, TeacherSource
from taid_vlm.teacher_cache.source import cached_teacher

from .objective import hidden_at
from .zero3 import gathered


class Teacher:
    """`hidden(inputs)` -> [K, H_t] at the supervised positions; `output_weight()` context -> [V, H_t]."""

    def __init__(self, model, placement: str, device: torch.device, dtype: torch.dtype, ds_config: Optional[dict] = None):
        self.placement = placement
        model = model.to(dtype=dtype)
        if placement == "zero3":
            import deepspeed

            engine, *_ = deepspeed.initialize(model=model, config=ds_config)
            self.engine = engine
            self.model = engine.module
        else:
            self.engine = None
            self.model = model.to(device)
        self.model.eval()

    @torch.no_grad()
    def hidden(self, inputs: dict) -> torch.Tensor:
        return hidden_at(self.model, inputs)

    @contextlib.contextmanager
    def output_weight(self) -> Iterator[torch.Tensor]:
        weight = self.model.output_weight()
        with gathered(weight):
            yield weight


@contextlib.contextmanager
def teacher_for_batch(teacher: Optional[Teacher], batch: dict, vocab_size: int) -> Iterator[Optional[TeacherSource]]:
    """The teacher side of a batch: its cached top-k when the batch carries one, else the teacher model
    run on ``batch["teacher"]`` (lm_head gathered under ZeRO-3 while the context is open), else None.
    Rows pair with ``batch["student"]["loss_targets"]``; the first ``vocab_size`` logits are compared."""
    if "teacher_topk" in batch:
        yield cached_teacher(batch["teacher_topk"])
    elif teacher is None:
        yield None
    else:
        hidden = teacher.hidden(batch["teacher"])
        with teacher.output_weight() as weight:
            yield OnlineTeacher(hidden, weight[:vocab_size])
