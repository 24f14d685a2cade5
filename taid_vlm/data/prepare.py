"""Prepare: one raw sample -> a ``Prepared`` record (decoded, rendered per model, aligned), and prepared
records -> one collated batch.

A raw sample carries its cached-teacher companion record (``COMPANION_FIELD``) or the reason the cache
writer skipped it (``COMPANION_SKIP``) when the run reads a teacher cache (stream.py pairs them).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Dict, List, NamedTuple, Optional

import torch

from ..spec import InputSpec
from .align import align_labels
from .collate import collate, collate_packed
from .render import IGNORE_INDEX, Rendered, Renderer, pad_token_id
from .samples import decode_sample
from .skips import UNALIGNED, SampleError, SkipCounter

COMPANION_FIELD = "__companion__"
COMPANION_SKIP = "__companion_skip__"
READ_SKIP = "__read_skip__"  # a sample whose bytes could not be read (its shard failed to fetch): the reason
FILLER_INDEX = -1  # the global index a filler carries


class Prepared(NamedTuple):
    """One sample ready to batch: ``parts`` is its rendering per model (student first, then the teacher's
    when an online teacher is used), ``record`` its cached-teacher rows (or None)."""

    key: Optional[str]  # None: a filler (no sample, no supervised token)
    parts: List[Rendered]
    record: Any = None
    index: int = FILLER_INDEX  # train: its global sample index (generation is seeded by it)
    after: Any = None  # eval: the worker's position after this sample


def as_filler(item: Prepared) -> Prepared:
    """The same sample with no supervised token and no key: it only keeps a micro-batch's forward/backward
    running (zero loss, zero gradient)."""
    masked: Dict[int, Rendered] = {}
    parts = [masked.setdefault(id(p), dataclasses.replace(p, labels=[IGNORE_INDEX] * len(p))) for p in item.parts]
    record = item.record.select(slice(0, 0)) if item.record is not None else None
    return Prepared(None, parts, record, FILLER_INDEX)


class Preparer:
    """Decode + render for every model + align, counting ``stats`` (samples, truncated, supervised_tokens,
    unaligned_tokens_dropped). ``companion``: a teacher cache (its records align to the student);
    ``prompt_tokens``: a raw-text document's prompt is its first that many tokens (render.Renderer)."""

    def __init__(self, student: InputSpec, teacher: Optional[InputSpec], *, max_length: int,
                 caption_instruction: str, text_only: bool, companion: Any = None, prompt_tokens: int = 0):
        self.caption_instruction, self.text_only, self.companion = caption_instruction, text_only, companion
        self.student_r = Renderer(student, max_length, prompt_tokens)
        self.teacher_r = None if teacher is None else (
            self.student_r if teacher is student else Renderer(teacher, max_length, prompt_tokens))
        self.pad_ids = [pad_token_id(student.tokenizer)] + ([] if teacher is None else [pad_token_id(teacher.tokenizer)])

    def __call__(self, raw: Dict[str, Any], stats: Counter) -> Prepared:
        if READ_SKIP in raw:
            raise SampleError(raw[READ_SKIP], "its shard could not be read")
        if COMPANION_SKIP in raw:
            raise SampleError(raw[COMPANION_SKIP], "skipped by the teacher cache writer")
        sample = decode_sample(raw, self.caption_instruction, self.text_only)
        s = self.student_r(sample)
        if self.companion is not None:
            record, labels, dropped = self.companion.align(raw[COMPANION_FIELD], s.labels, sample.key)
            if dropped:
                stats["unaligned_tokens_dropped"] += dropped
                s.labels = labels
            self._count(stats, [s], int(record.targets.shape[0]))
            return Prepared(sample.key, [s], record)
        parts = [s] if self.teacher_r is None else [s, s] if self.teacher_r is self.student_r else self._pair(s, sample, stats)
        self._count(stats, parts, sum(1 for x in s.labels[1:] if x != IGNORE_INDEX))
        return Prepared(sample.key, parts)

    def _pair(self, s: Rendered, sample, stats: Counter) -> List[Rendered]:
        t = self.teacher_r(sample)
        sl, tl, dropped = align_labels(s.labels, t.labels)
        if dropped:
            stats["unaligned_tokens_dropped"] += dropped
            s.labels, t.labels = sl, tl
            if not any(x != IGNORE_INDEX for x in sl[1:]):
                raise SampleError(UNALIGNED, "teacher and student share no supervised token")
        return [s, t]

    @staticmethod
    def _count(stats: Counter, parts: List[Rendered], supervised: int) -> None:
        stats["samples"] += 1
        stats["truncated"] += int(any(p.truncated for p in parts))
        stats["supervised_tokens"] += supervised

    def counted(self, raw: Dict[str, Any], skips: SkipCounter, stats: Counter) -> Optional[Prepared]:
        """``self(raw)``, or None with the reason counted in ``skips``."""
        try:
            return self(raw, stats)
        except SampleError as e:
            skips.add(e.reason, raw.get("__key__"))
            return None

    def batch(self, items: list, packed: bool, pad_to_multiple_of: Optional[int], with_indices: bool) -> Dict[str, Any]:
        """Prepared records (or, packed, rows of them) -> the batch dict of the package docstring."""
        out: Dict[str, Any] = {}
        for m, name in enumerate(["student", "teacher"][: len(self.pad_ids)]):
            if packed:
                out[name] = collate_packed([[it.parts[m] for it in row] for row in items], self.pad_ids[m],
                                           pad_to_multiple_of)
            else:
                out[name] = collate([it.parts[m] for it in items], self.pad_ids[m], pad_to_multiple_of)
        flat: List[Prepared] = [it for row in items for it in row] if packed else items
        out["keys"] = [it.key for it in flat if it.key is not None]  # a filler (key None) is no sample
        if with_indices:  # train: each row's global sample index (-1: a filler)
            out["indices"] = [it.index for it in flat]
        if self.companion is not None:  # records in loss_targets order: sample-major, then token order
            topk = self.companion.collate([it.record for it in flat])
            if not torch.equal(topk.pop("targets").long(), out["student"]["loss_targets"]):
                raise RuntimeError(f"teacher cache rows do not line up with the student's supervised tokens "
                                   f"(samples {out['keys'][:4]}); this is a bug")
            out["teacher_topk"] = topk
        return out
