"""The teacher side of a batch read from a cache (``batch["teacher_topk"]``), as a TeacherSource.

- a top-k cache: ``{"ids", "logprobs", "log_tail", "tail"}`` -> CachedTopKTeacher (the tail model the
  cache was written with; an old cache without one: uniform);
- a hidden-state cache: ``{"hidden" [K, H], "lm_head": LMHead}`` -> OnlineTeacher(hidden, lm_head): the
  online teacher's own computation (``hidden @ W.T`` in the stored dtype, then float32).
"""

from __future__ import annotations

from taid_vlm.losses import CachedTopKTeacher, OnlineTeacher, TeacherSource


def cached_teacher(entry: dict, name: str = "teacher cache") -> TeacherSource:
    if "hidden" in entry:
        hidden = entry["hidden"]
        weight = entry["lm_head"].weight(hidden.device)
        return OnlineTeacher(hidden.to(weight.dtype), weight)
    return CachedTopKTeacher.from_batch(name, entry)
