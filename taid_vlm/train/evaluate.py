"""Held-out metrics of the student against the teacher, on supervised text tokens, summed over ranks.

eval_kl: KL(p_T || q_S) per token; eval_top1_agreement: argmax agreement; eval_student_ce /
eval_teacher_ce: cross-entropy of the target token; eval_student_acc / eval_teacher_acc: argmax ==
target (the answer-token accuracy on Q/A data). Logits are computed chunk by chunk, never all at once.

From a teacher cache (``batch["teacher_topk"]``) the teacher is its top-k + uniform tail (see
taid_vlm.teacher_cache): teacher argmax, top-1 agreement and teacher accuracy are exact; teacher CE
is exact when the target is in the top-k, else the tail-uniform value; eval_kl is KL(p~ || q_S).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from taid_vlm.losses import TeacherSource
from taid_vlm.progress import LoopProgress

from .launch_env import all_reduce_sum
from .objective import hidden_at
from .teacher import teacher_for_batch
from .zero3 import gathered

METRICS = ("kl", "top1_agreement", "student_ce", "teacher_ce", "student_acc", "teacher_acc")
TEACHER_METRICS = ("kl", "top1_agreement", "teacher_ce", "teacher_acc")


@torch.no_grad()
def metric_sums(h_s, w_s, teacher: Optional[TeacherSource], targets, chunk: int = 256) -> dict[str, float]:
    """Sums over the K supervised tokens: h_s [K, H], w_s [V, H], targets [K]; teacher rows pair with them."""
    sums = dict.fromkeys(METRICS, 0.0)
    for start in range(0, h_s.shape[0], chunk):
        end = min(start + chunk, h_s.shape[0])
        y = targets[start:end]
        logq = torch.log_softmax((h_s[start:end] @ w_s.T).float(), -1)
        sums["student_ce"] += float(-logq.gather(-1, y[:, None]).sum())
        sums["student_acc"] += float((logq.argmax(-1) == y).sum())
        if teacher is None:
            continue
        logp = torch.log_softmax(teacher.fill(torch.empty_like(logq), start, end), -1)
        p = logp.exp()
        sums["kl"] += float(torch.where(p > 0, p * (logp - logq), 0.0).sum())
        top1 = teacher.top1(logp, start, end)
        sums["top1_agreement"] += float((top1 == logq.argmax(-1)).sum())
        sums["teacher_ce"] += float(-logp.gather(-1, y[:, None]).sum())
        sums["teacher_acc"] += float((top1 == y).sum())
    return sums


def evaluate(student, teacher, batches: Iterable[dict], device, vocab_size: int, max_batches: int = 0,
             to_device=None, progress: Optional[str] = None, generation=None) -> dict[str, float]:
    """Every rank calls this. Ranks that run out of batches keep stepping with a zero-weight batch so that
    ZeRO-3's collective parameter gathers stay matched. ``student``: the student model (put in eval mode
    for the loop, its mode restored after); ``teacher`` a train.teacher.Teacher or None (batches may carry a
    cached top-k instead). ``progress``: the name to show the loop's progress under (taid_vlm.progress; None: silent, e.g. ranks > 0).
    ``generation``: a generation_metric.GenerationScorer (train.eval_generation) fed every batch, or None."""
    was_training = student.training
    student.eval()
    totals = dict.fromkeys(METRICS, 0.0)
    count, seen, with_teacher = 0.0, 0, teacher is not None
    iterator = iter(batches)
    last: Optional[dict] = None
    shown = LoopProgress(progress or "", max_batches or None, enabled=progress is not None)
    try:
        while True:
            batch = next(iterator, None) if not max_batches or seen < max_batches else None
            if all_reduce_sum([1.0 if batch is not None else 0.0], device)[0] == 0:
                break
            real = batch is not None
            if not real:
                if last is None:
                    raise RuntimeError("evaluation: this rank got no validation batch at all; use more val shards")
                batch = last
            last, seen = batch, seen + 1
            if to_device is not None:
                batch = to_device(batch)
            sums, has_teacher = _batch_sums(student, teacher, batch, vocab_size)
            with_teacher = with_teacher or has_teacher
            if real:
                for k in METRICS:
                    totals[k] += sums[k]
                count += float(batch["student"]["loss_targets"].numel())
            if generation is not None:
                generation.add(batch if real else None)
            shown.advance()
    finally:
        shown.close()
        student.train(was_training)
    reduced = all_reduce_sum([totals[k] for k in METRICS] + [count], device)
    n = max(reduced[-1], 1.0)
    out = {f"eval_{k}": v / n for k, v in zip(METRICS, reduced[:-1]) if with_teacher or k not in TEACHER_METRICS}
    out["eval_tokens"] = int(reduced[-1])
    return {**out, **(generation.result() if generation is not None else {})}


@torch.no_grad()
def _batch_sums(student, teacher, batch: dict, vocab_size: int) -> tuple[dict[str, float], bool]:
    s_in = batch["student"]
    h_s = hidden_at(student, s_in)
    w_s = student.output_weight()
    with teacher_for_batch(teacher, batch, vocab_size) as source, gathered(w_s):
        return metric_sums(h_s, w_s[:vocab_size], source, s_in["loss_targets"]), source is not None
