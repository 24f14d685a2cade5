"""Held-out metrics of the student against the teacher, on supervised text tokens, summed over ranks.

eval_kl: KL(p_T || q_S) per token; eval_top1_agreement: argmax agreement; eval_student_ce /
eval_teacher_ce: cross-entropy of the target token; eval_student_acc / eval_teacher_acc: argmax ==
target (the answer-token accuracy on Q/A data). Logits are computed chunk by chunk, never all at once.

From a teacher cache (``batch["teacher_topk"]``) the teacher is its top-k + uniform tail (see
taid_vlm.teacher_cache): teacher argmax, top-1 agreement and teacher accuracy are exact; teacher CE
is exact when the target is in the top-k, else the tail-uniform value; eval_kl is KL(p~ || q_S).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch

from .launch_env import all_reduce_sum
from .objective import hidden_at
from .zero3 import gathered

METRICS = ("kl", "top1_agreement", "student_ce", "teacher_ce", "student_acc", "teacher_acc")


@torch.no_grad()
def metric_sums(h_s, w_s, h_t, w_t, targets, chunk: int = 256, teacher_topk: Optional[dict] = None) -> dict[str, float]:
    sums = dict.fromkeys(METRICS, 0.0)
    for start in range(0, h_s.shape[0], chunk):
        y = targets[start : start + chunk]
        logq = torch.log_softmax((h_s[start : start + chunk] @ w_s.T).float(), -1)
        sums["student_ce"] += float(-logq.gather(-1, y[:, None]).sum())
        sums["student_acc"] += float((logq.argmax(-1) == y).sum())
        logp = None
        if teacher_topk is not None:
            from taid_vlm.losses.chunked import topk_log_probs_into

            part = [teacher_topk[k][start : start + chunk] for k in ("ids", "logprobs", "log_tail")]
            logp = torch.log_softmax(topk_log_probs_into(torch.empty_like(logq), *part), -1)
        elif h_t is not None:
            logp = torch.log_softmax((h_t[start : start + chunk] @ w_t.T).float(), -1)
        if logp is not None:
            p = logp.exp()
            sums["kl"] += float(torch.where(p > 0, p * (logp - logq), 0.0).sum())
            # from a cache the stored top-1 is the teacher's argmax (16-bit ties cannot reorder it)
            top1 = teacher_topk["ids"][start : start + chunk, 0].long() if teacher_topk is not None else logp.argmax(-1)
            sums["top1_agreement"] += float((top1 == logq.argmax(-1)).sum())
            sums["teacher_ce"] += float(-logp.gather(-1, y[:, None]).sum())
            sums["teacher_acc"] += float((top1 == y).sum())
    return sums


def evaluate(objective, teacher, batches: Iterable[dict], device, vocab_size: int, max_batches: int = 0,
             to_device=None) -> dict[str, float]:
    """Every rank calls this. Ranks that run out of batches keep stepping with a zero-weight batch so that
    ZeRO-3's collective parameter gathers stay matched."""
    was_training = objective.training
    objective.eval()
    totals = dict.fromkeys(METRICS, 0.0)
    count = 0.0
    iterator = iter(batches)
    last: Optional[dict] = None
    seen = 0
    try:
        while True:
            batch = None
            if not max_batches or seen < max_batches:
                batch = next(iterator, None)
            active = all_reduce_sum([1.0 if batch is not None else 0.0], device)[0]
            if active == 0:
                break
            real = batch is not None
            if not real:
                if last is None:
                    raise RuntimeError("evaluation: this rank got no validation batch at all; use more val shards")
                batch = last
            last = batch
            seen += 1
            if to_device is not None:
                batch = to_device(batch)
            s_in = batch["student"]
            topk = batch.get("teacher_topk")
            with torch.no_grad():
                h_s = hidden_at(objective.student, s_in)
                h_t = teacher.hidden(batch["teacher"]) if teacher is not None else None
                w_s = objective.student.output_weight()
                ctx = gathered(w_s)
                t_ctx = teacher.output_weight() if teacher is not None else contextlib.nullcontext(None)
                with ctx, t_ctx as w_t:
                    sums = metric_sums(h_s, w_s[:vocab_size], h_t, w_t[:vocab_size] if w_t is not None else None,
                                       s_in["loss_targets"], teacher_topk=topk)
            if real:
                for k in METRICS:
                    totals[k] += sums[k]
                count += float(s_in["loss_targets"].numel())
    finally:
        objective.train(was_training)
    reduced = all_reduce_sum([totals[k] for k in METRICS] + [count], device)
    n = max(reduced[-1], 1.0)
    out = {f"eval_{k}": v / n for k, v in zip(METRICS, reduced[:-1])}
    if teacher is None and (last is None or "teacher_topk" not in last):
        for k in ("kl", "top1_agreement", "teacher_ce", "teacher_acc"):
            out.pop(f"eval_{k}")
    out["eval_tokens"] = int(reduced[-1])
    return out
