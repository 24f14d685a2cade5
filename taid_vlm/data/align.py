"""Teacher/student alignment of supervised text tokens.

The loss compares the two models on TEXT tokens only. Both render the same sample with the same
tokenizer vocabulary, but may differ in image-token counts, chat templates (other end-of-turn tokens,
other separators that change a merge) and truncation. ``align_labels`` keeps, in each model's labels,
only the supervised tokens that have a partner in the other model's: the longest matching subsequence
of the two supervised-token lists (difflib; identical lists, the usual case, take a fast path).
Afterwards both label sequences carry the same supervised tokens in the same order, so the k-th
supervised token of the student is the k-th of the teacher.

``loss_positions`` turns a padded ``labels[B, T]`` into the flat positions ``b*T + i`` of the hidden
states that predict a supervised token (the token at ``i + 1``) and those tokens, row-major.
"""

from __future__ import annotations

from difflib import SequenceMatcher
from typing import List, Tuple

import torch

from .render import IGNORE_INDEX


def matching_tokens(student: List[int], teacher: List[int]) -> Tuple[List[int], List[int]]:
    """Indices into two token lists of their longest matching subsequence, in order (difflib; identical
    lists take a fast path). The one alignment rule: online pairs and a teacher cache's rows use it."""
    if student == teacher:
        return list(range(len(student))), list(range(len(teacher)))
    keep_s, keep_t = [], []
    for a, b, size in SequenceMatcher(None, student, teacher, autojunk=False).get_matching_blocks():
        keep_s += range(a, a + size)
        keep_t += range(b, b + size)
    return keep_s, keep_t


def align_labels(student: List[int], teacher: List[int]) -> Tuple[List[int], List[int], int]:
    """Return ``(student_labels, teacher_labels, n_dropped)`` with only matched supervised tokens kept.

    ``n_dropped`` counts supervised tokens removed on both sides together.
    """
    ps = [i for i, x in enumerate(student) if x != IGNORE_INDEX]
    pt = [i for i, x in enumerate(teacher) if x != IGNORE_INDEX]
    ts = [student[i] for i in ps]
    tt = [teacher[i] for i in pt]
    if ts == tt:
        return student, teacher, 0
    new_s = [IGNORE_INDEX] * len(student)
    new_t = [IGNORE_INDEX] * len(teacher)
    keep_s, keep_t = matching_tokens(ts, tt)
    for a, b in zip(keep_s, keep_t):
        new_s[ps[a]] = student[ps[a]]
        new_t[pt[b]] = teacher[pt[b]]
    return new_s, new_t, len(ts) + len(tt) - 2 * len(keep_s)


def loss_positions(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``labels[B, T]`` (unshifted, -100 = unsupervised) -> (flat positions ``[K]``, targets ``[K]``)."""
    B, T = labels.shape
    nxt = labels[:, 1:]
    b, i = (nxt != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major: sample order, then token order
    return (b * T + i).long(), nxt[b, i].long()
