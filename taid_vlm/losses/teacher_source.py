"""Where the teacher's side of the chunked loss comes from: one interface, three sources.

The chunked loss, the evaluator and the teacher-cache writer never see a whole ``[N, V]`` teacher
logit matrix. They ask a ``TeacherSource`` for rows ``start:end`` of it, written into a reusable
``[C, V]`` buffer:

- ``OnlineTeacher(hidden [N, H], weight [V, H])``: a teacher model run on this batch; the rows are
  ``hidden @ weight.T`` (matmul in the model's dtype, then float32), exactly what the student side does.
- ``LogitsTeacher(logits [N, V])``: logits computed elsewhere.
- ``CachedTopKTeacher(ids [N, k], logprobs [N, k], log_tail [N], tail)``: a top-k teacher cache
  (taid_vlm.teacher_cache); the rows are its log-probs rebuilt with the tail mass spread uniformly
  (``tail="uniform"``) or in proportion to the student's own probabilities on the tail
  (``tail="student"``: needs the student's logits of the same rows, see ``fill_for_student``).
  Every loss is a function of softmax(a * teacher + b) with a per-row constant b, so log-probs stand
  in for logits.
- A hidden-state cache (the teacher's final hidden states + its lm_head stored once) is an
  ``OnlineTeacher``: the rows are rebuilt exactly (up to the storage dtype).

The chunked loss calls ``fill_for_student(out, start, end, student_logits)``: the student's logits of
the same rows (read only, not yet differentiated) for the sources whose rows depend on them; the
others ignore them.

Row ``i`` of a source pairs with the student's ``i``-th supervised token. ``select(mask)`` keeps the
rows where the loss mask is true; ``check(name, n, v)`` raises a ValueError naming the loss when the
shapes do not fit ``n`` student tokens over a ``v``-entry vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch


def matmul_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out <- hidden @ weight.T, in out's (float32+) dtype; straight into `out` when the dtypes agree."""
    if hidden.dtype == out.dtype and weight.dtype == out.dtype:
        return torch.mm(hidden, weight.T, out=out)
    return out.copy_(hidden @ weight.T)


def topk_log_probs_into(out: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor) -> torch.Tensor:
    """out [C, V] <- the teacher's log-probs rebuilt from its top-k: ``logprobs`` at ``ids`` ([C, k]),
    ``log_tail - log(V - k)`` (the remaining mass spread uniformly) everywhere else. Rows whose tail is
    empty (log_tail = -inf) get -inf there; with k = V every entry comes from ``logprobs``."""
    k, v = ids.shape[1], out.shape[1]
    if k < v:
        out.copy_((log_tail.to(out.dtype) - math.log(v - k)).unsqueeze(1).expand_as(out))
    return out.scatter_(1, ids.long(), logprobs.to(out.dtype))


def student_tail_log_probs_into(out: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor,
                                student_logits: torch.Tensor) -> torch.Tensor:
    """out [C, V] <- the teacher's top-k log-probs at ``ids``, and on the other V - k tokens the tail mass
    spread in proportion to the student's probabilities there:
    ``log_tail + z_S,v - logsumexp_{u not in top-k} z_S,u``. So TAID's target on the tail follows the
    student's shape and reverse KL sees ``log q - log p~`` constant on it. Rows with an empty tail
    (log_tail = -inf) get -inf there."""
    k, v = ids.shape[1], out.shape[1]
    if k == v:
        return out.scatter_(1, ids.long(), logprobs.to(out.dtype))
    index = ids.long()
    out.copy_(student_logits).scatter_(1, index, float("-inf"))
    student_tail = torch.logsumexp(out, -1, keepdim=True)  # over the tail only: no cancellation
    out.sub_(student_tail).add_(log_tail.to(out.dtype).unsqueeze(1))
    return out.scatter_(1, index, logprobs.to(out.dtype))


class TeacherSource:
    """Rows of the teacher's [N, V] logits, on demand."""

    def fill(self, out: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Write rows start:end into ``out`` ([end - start, V], float32 or wider) and return it."""
        raise NotImplementedError

    def fill_for_student(self, out: torch.Tensor, start: int, end: int, student_logits: torch.Tensor) -> torch.Tensor:
        """``fill``, for a source whose rows may depend on the student's logits of the same rows [end - start, V]."""
        return self.fill(out, start, end)

    def select(self, mask: torch.Tensor) -> "TeacherSource":
        """The rows where ``mask`` ([N] bool) is true, detached from any graph."""
        raise NotImplementedError

    def check(self, name: str, n: int, v: int) -> None:
        """ValueError (prefixed with the loss ``name``) unless the source has ``n`` rows over ``v`` entries."""
        raise NotImplementedError

    def top1(self, log_probs: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """The teacher's argmax for rows start:end, given their log-probs."""
        return log_probs.argmax(-1)


class OnlineTeacher(TeacherSource):
    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        self.hidden, self.weight = hidden, weight

    def fill(self, out, start, end):
        return matmul_into(out, self.hidden[start:end], self.weight)

    def select(self, mask):
        return OnlineTeacher(self.hidden[mask].detach(), self.weight.detach())

    def check(self, name, n, v):
        h, w = self.hidden, self.weight
        if h.dim() != 2 or h.shape[0] != n:
            raise ValueError(f"{name}: teacher_hidden shape {tuple(h.shape)} does not match {n} student tokens")
        if w.dim() != 2 or w.shape[1] != h.shape[1]:
            raise ValueError(f"{name}: teacher_weight {tuple(w.shape)} does not fit teacher_hidden {tuple(h.shape)}")
        if w.shape[0] != v:
            raise ValueError(
                f"{name}: vocabulary mismatch: student lm_head has {v} rows, teacher lm_head has "
                f"{w.shape[0]}; slice both to the shared tokenizer vocabulary first"
            )


class LogitsTeacher(TeacherSource):
    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def fill(self, out, start, end):
        return out.copy_(self.logits[start:end])

    def select(self, mask):
        return LogitsTeacher(self.logits[mask].detach())

    def check(self, name, n, v):
        if tuple(self.logits.shape) != (n, v):
            raise ValueError(
                f"{name}: teacher_logits shape {tuple(self.logits.shape)} does not match [N, V] = [{n}, {v}]"
            )


TAILS = ("uniform", "student")


class CachedTopKTeacher(TeacherSource):
    """``tail``: how the mass outside the top-k is spread: ``uniform`` over the other V - k tokens, or like
    the student (``student``; where no student logits are given, as in the evaluator, uniform)."""

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor, tail: str = "uniform"):
        if tail not in TAILS:
            raise ValueError(f"teacher cache tail must be one of {TAILS}, got {tail!r}")
        self.ids, self.logprobs, self.log_tail, self.tail = ids, logprobs, log_tail, tail

    @classmethod
    def from_batch(cls, name: str, topk: Any) -> "CachedTopKTeacher":
        """From ``batch["teacher_topk"]`` (a dict with ids / logprobs / log_tail [/ tail]) or that triple."""
        if isinstance(topk, dict):
            missing = {"ids", "logprobs", "log_tail"} - set(topk)
            if missing:
                raise ValueError(f"{name}: teacher_topk lacks {sorted(missing)}")
            return cls(topk["ids"], topk["logprobs"], topk["log_tail"], topk.get("tail", "uniform"))
        return cls(*topk)

    def fill(self, out, start, end):
        return topk_log_probs_into(out, self.ids[start:end], self.logprobs[start:end], self.log_tail[start:end])

    def fill_for_student(self, out, start, end, student_logits):
        if self.tail == "uniform":
            return self.fill(out, start, end)
        return student_tail_log_probs_into(out, self.ids[start:end], self.logprobs[start:end], self.log_tail[start:end],
                                           student_logits)

    def select(self, mask):
        return CachedTopKTeacher(*(x[mask].detach() for x in (self.ids, self.logprobs, self.log_tail)), tail=self.tail)

    def top1(self, log_probs, start, end):
        # the stored top-1 is the teacher's argmax (16-bit ties in the stored log-probs cannot reorder it)
        return self.ids[start:end, 0].long()

    def check(self, name, n, v):
        ids, logprobs, log_tail = self.ids, self.logprobs, self.log_tail
        if ids.dim() != 2 or ids.shape[0] != n or logprobs.shape != ids.shape or log_tail.shape != (n,):
            raise ValueError(
                f"{name}: teacher_topk must be ids [N, k], logprobs [N, k], log_tail [N] with N = {n}, got "
                f"{tuple(ids.shape)}, {tuple(logprobs.shape)}, {tuple(log_tail.shape)}"
            )
        if ids.dtype.is_floating_point or not logprobs.dtype.is_floating_point:
            raise ValueError(f"{name}: teacher_topk ids must be integers and logprobs floats, got {ids.dtype}, {logprobs.dtype}")
        k = ids.shape[1]
        if not 1 <= k <= v:
            raise ValueError(f"{name}: teacher_topk has k = {k}; needs 1 <= k <= vocabulary size {v}")
        if n and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(
                f"{name}: vocabulary mismatch: teacher_topk ids range [{int(ids.min())}, {int(ids.max())}] does not fit "
                f"the student's {v} logits"
            )


__all__ = ["TeacherSource", "OnlineTeacher", "LogitsTeacher", "CachedTopKTeacher",
           "matmul_into", "topk_log_probs_into",
           "student_tail_log_probs_into", "TAILS"]
