"""lm_head + loss fused over chunks of tokens, with the gradients computed during the forward pass.

Materialising student and teacher logits for N tokens at a 152k vocabulary costs N x V x 4 bytes per
copy, and a plain autograd implementation keeps several such copies (logits, log-softmaxes, their
gradients). Here each chunk of C tokens computes its logits, its loss and d(loss)/d(logits), folds
that into d/d(hidden) and d/d(weight) right away, and frees everything [C, V] before the next chunk
(the approach of Liger-Kernel's chunked losses, written out in PyTorch). Backward only rescales the
stored gradients by the incoming one.

Hand-written on purpose: Liger-Kernel implements this for a fixed set of losses on GPUs with Triton;
here it must serve every loss of the registry (incl. CTKD's learnable temperature) on CPU and GPU.

The teacher side comes as hidden states + lm_head weight (online teacher), as precomputed logits
[N, V], or as a cached top-k (``teacher_topk``: ids [N, k], log-probs [N, k], log of the remaining
mass [N]; see taid_vlm.teacher_cache). The top-k form is expanded chunk by chunk into the same teacher
buffer: the k stored log-probs at their ids, ``log_tail - log(V - k)`` everywhere else (the tail mass
spread uniformly over the other V - k tokens). Every loss is a function of softmax(a * teacher + b)
with a per-row constant b, so these log-probs stand in for logits; with k = V the buffer holds the
teacher's exact log-probs and the loss equals the online one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .inputs import check_mask_and_labels
from .teacher_source import TeacherSource, matmul_into as _matmul_into, topk_log_probs_into  # noqa: F401 (re-export)

TARGET_CHUNK_ELEMENTS = 1 << 25  # 128 MB per float32 [C, V] buffer: C = 216 at V = 152k
# On a CPU the chunk's matmuls are compute-bound already at ~100 rows (re-reading the [V, H] weights per
# chunk is cheap next to the FLOPs), so half the rows cost no measurable time and save 3 x 64 MB of [C, V]
# workspaces at the step's memory peak (benchmarks/peer_bench.py, docs/benchmarks.md).
CPU_TARGET_CHUNK_ELEMENTS = 1 << 24  # C = 104 at V = 152k
# On a GPU 216 rows leave the tensor cores idle between small matmuls (an H200 at N = 16,384: 1.3x slower
# than 2048 rows): 1 GiB per float32 [C, V] buffer there, C = 1760 at V = 152k.
GPU_TARGET_CHUNK_ELEMENTS = 1 << 28


def default_chunk_size(num_tokens: int, vocab_size: int, device: Optional[torch.device] = None) -> int:
    """C with C * V ~ TARGET_CHUNK_ELEMENTS (CPU_/GPU_TARGET_CHUNK_ELEMENTS when ``device`` is a CPU / GPU),
    a multiple of 8 (at least 8), at most num_tokens.

    Each chunk reads the [V, H] weights and read-writes the [V, H] weight gradient once, so small
    chunks are bound by memory traffic on a GPU; benchmarks/loss_bench.py has the measured trade-off.
    """
    kind = torch.device(device).type if device is not None else None
    target = {"cpu": CPU_TARGET_CHUNK_ELEMENTS, "cuda": GPU_TARGET_CHUNK_ELEMENTS}.get(kind, TARGET_CHUNK_ELEMENTS)
    rows = max(target // max(vocab_size, 1) // 8 * 8, 8)
    return max(1, min(rows, num_tokens))


def _accumulate_weight_grad(grad_w, d_logits, h_chunk, first: bool) -> None:
    """grad_w (+)= d_logits.T @ h_chunk: the first chunk writes (no zero-filled [V, H] buffer to add to),
    later ones add in place. bf16/fp16 weights: each chunk's matmul runs in that dtype (tensor cores,
    fp32 accumulation inside the matmul; a float32 one ran 2.4x slower on an H200) and only the sum over
    chunks is float32."""
    if d_logits.dtype == grad_w.dtype:
        d_t, h = d_logits.T, h_chunk.to(grad_w.dtype)
        if first:
            torch.mm(d_t, h, out=grad_w)
        else:
            grad_w.addmm_(d_t, h)
        return
    part = torch.mm(d_logits.T, h_chunk.to(d_logits.dtype))
    if first:
        grad_w.copy_(part)
    else:
        grad_w.add_(part)


class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, teacher: Optional[TeacherSource], labels, loss_fn, chunk_size, denominator, num_params,
                *params):
        n = h_s.shape[0]
        denom = float(denominator)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_params = [ctx.needs_input_grad[8 + i] for i in range(num_params)]
        grad_h = torch.empty_like(h_s) if need_h else None
        # Accumulated in at least float32 (bf16 sums over many chunks lose precision); written by the first chunk.
        grad_w = torch.empty(w_s.shape, dtype=torch.promote_types(w_s.dtype, torch.float32), device=w_s.device) if need_w else None
        grad_params = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.promote_types(h_s.dtype, torch.float32), device=h_s.device)
        trainable = [p for p, need in zip(params, need_params) if need]

        closed_form = loss_fn.closed_form if loss_fn.has_closed_form and not params else None
        compute_dtype = torch.promote_types(h_s.dtype, torch.float32)
        # [C, V] workspaces allocated once and reused by every chunk.
        rows, vocab = min(chunk_size, n), w_s.shape[0]
        s_buf = torch.empty(rows, vocab, dtype=compute_dtype, device=h_s.device)
        t_buf = torch.empty_like(s_buf) if teacher is not None else None
        scratch = torch.empty_like(s_buf) if closed_form is not None else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h_chunk = h_s[start:end]
            y = labels[start:end] if labels is not None else None
            s_logits = _matmul_into(s_buf[: end - start], h_chunk, w_s)
            # a cached top-k teacher with a student-shaped tail reads the student's logits of these rows
            teacher_chunk = teacher.fill_for_student(t_buf[: end - start], start, end, s_logits) if teacher is not None else None
            if closed_form is not None:
                values, d_logits = closed_form(s_logits, teacher_chunk, y, scratch=scratch[: end - start])
                chunk_loss = values.sum() / denom
                d_logits = d_logits.div_(denom)
            else:
                with torch.enable_grad():
                    s_logits.requires_grad_(True)
                    chunk_loss = loss_fn.per_token(s_logits, teacher_chunk, y).sum() / denom
                    grads = torch.autograd.grad(chunk_loss, [s_logits, *trainable], allow_unused=True)
                s_logits.requires_grad_(False)
                d_logits = grads[0]
                k = 1
                for i, need in enumerate(need_params):
                    if need:
                        if grads[k] is not None:
                            grad_params[i] += grads[k]
                        k += 1
                del grads
            total += chunk_loss.detach()
            d_logits = d_logits.to(w_s.dtype)
            if need_h:
                torch.mm(d_logits, w_s, out=grad_h[start:end])
            if need_w:
                _accumulate_weight_grad(grad_w, d_logits, h_chunk, first=start == 0)
            del d_logits, chunk_loss, s_logits, teacher_chunk
        del s_buf, t_buf, scratch

        # Kept as plain attributes (not save_for_backward) and handed over in backward, so that
        # autograd can adopt the [V, H] weight gradient as W.grad instead of cloning it.
        ctx.grads = [grad_h, grad_w.to(w_s.dtype) if need_w else None, *grad_params]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("chunked lm_head loss: backward called twice (its gradients are handed over once)")
        unit = bool(grad_out == 1)  # the usual case: no [V, H] multiply, no copy
        scaled = [g if g is None or unit else g * grad_out.to(g.dtype) for g in grads]
        del grads
        grad_h, grad_w, *grad_params = scaled
        return (grad_h, grad_w, None, None, None, None, None, None, *grad_params)


def chunked_lm_head_loss(
    loss_fn,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: Optional[TeacherSource],
    mask: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    chunk_size: Optional[int],
    denominator: Optional[float] = None,
) -> torch.Tensor:
    """See DistillationLoss.fused (``loss_fn`` is a DistillationLoss). ``denominator``: what the sum over
    tokens is divided by; None, the number of masked-in tokens here (a mean). The trainer passes the token
    count of the whole optimizer step (all micro-batches, all ranks) so that the step's gradient is that
    of one global mean."""
    name = loss_fn.name
    if student_hidden.dim() != 2 or student_weight.dim() != 2:
        raise ValueError(
            f"{name}: student_hidden must be [N, H] and student_weight [V, H], got "
            f"{tuple(student_hidden.shape)} and {tuple(student_weight.shape)}"
        )
    n, h = student_hidden.shape
    v = student_weight.shape[0]
    if student_weight.shape[1] != h:
        raise ValueError(f"{name}: student_hidden has {h} features but student_weight is {tuple(student_weight.shape)}")
    if not loss_fn.needs_teacher:
        teacher = None
    elif teacher is None:
        raise ValueError(f"{name}: needs a teacher (a TeacherSource: OnlineTeacher(h_t, W_t), LogitsTeacher or "
                         "CachedTopKTeacher)")
    else:
        teacher.check(name, n, v)
    if denominator is not None and not float(denominator) > 0:
        raise ValueError(f"{name}: denominator must be > 0, got {denominator}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")

    mask = check_mask_and_labels(loss_fn, n, v, mask, labels, student_hidden.device)
    h_s = student_hidden[mask]
    k = h_s.shape[0]
    if k == 0:
        return (student_hidden.sum() + student_weight.sum()) * 0.0
    with torch.no_grad():
        teacher = teacher.select(mask) if teacher is not None else None
    y = labels[mask] if labels is not None else None
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(k, v, student_hidden.device)
    params = list(loss_fn.parameters())
    denom = float(denominator) if denominator is not None else float(k)
    return _ChunkedLMHeadLoss.apply(h_s, student_weight, teacher, y, loss_fn, chunk, denom, len(params), *params)
