"""One Triton kernel for forward KL and TAID on a GPU: the chunk's loss values and d/d(student logits) in
two passes over its [C, V] logits, instead of the ~15 elementwise passes of the torch closed form.

Per row (p: softmax of the target z = target_logits + w * student_logits; w = 1 - t for TAID, where
softmax's shift invariance lets the student LOGITS stand in for log q; 0 for forward KL):

    pass 1: running max and sum of exp for the student logits and for z (online softmax);
    pass 2: log q, log p, value = sum_v p_v (log p_v - log q_v) [- ce * log q_y],
            gradient q - p [+ ce * (q - onehot(y))] written over the student logits.

Same contract as closed_form.forward_kl_and_grad (which calls this for CUDA tensors): the gradient
aliases the student buffer, teacher entries may be -inf (banned; they get p = 0), student logits are
finite. Everything is computed in float32 whatever the buffers' dtype. Liger-Kernel does the same for its
JSD with one kernel per loss; this one is ours because it must take TAID's interpolated target and the
chunked path's buffers as they are. Tests run it under Triton's CPU interpreter (TRITON_INTERPRET=1)
against the torch closed form; its speed is measured on a GPU by benchmarks/loss_bench.py.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Elements of a row each program handles per step, and warps per program: fixed rather than autotuned
# (an autotuner re-runs the kernel, which overwrites its own input). Environment overrides for tuning.
BLOCK = int(os.environ.get("TAID_VLM_TRITON_BLOCK", "4096"))
NUM_WARPS = int(os.environ.get("TAID_VLM_TRITON_WARPS", "8"))


@triton.jit
def _forward_kl_rows(S, T, Y, Values, V, stride_s, stride_t, s_weight, ce_weight,
                     HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    # pass 1: online max / sum of exp of the student logits and of the target z
    m_s = neg_inf
    d_s = 0.0
    m_z = neg_inf
    d_z = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(tl.float32)
        tz = tl.load(t_row + cols, mask=mask, other=neg_inf).to(tl.float32)
        z = tl.where(mask, tz + s_weight * tl.where(mask, s, 0.0), neg_inf)  # no w * -inf (NaN at w = 0)
        new_s = tl.maximum(m_s, tl.max(s, 0))
        d_s = d_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s), 0)
        m_s = new_s
        new_z = tl.maximum(m_z, tl.max(z, 0))
        safe_z = tl.where(new_z == neg_inf, 0.0, new_z)  # a block the teacher bans entirely
        d_z = d_z * tl.exp(m_z - safe_z) + tl.sum(tl.exp(z - safe_z), 0)
        m_z = new_z
    lse_s = m_s + tl.log(d_s)
    lse_z = m_z + tl.log(d_z)

    # pass 2: value and gradient
    value = 0.0
    y_logq = 0.0
    if HAS_LABELS:
        y = tl.load(Y + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        tz = tl.load(t_row + cols, mask=mask, other=neg_inf).to(tl.float32)
        z = tl.where(mask, tz + s_weight * s, neg_inf)
        logq = s - lse_s
        logp = z - lse_z
        p = tl.exp(logp)
        q = tl.exp(logq)
        value += tl.sum(tl.where(mask & (p > 0), p * (logp - logq), 0.0), 0)
        grad = q - p
        if HAS_LABELS:
            is_y = cols == y
            y_logq += tl.sum(tl.where(is_y & mask, logq, 0.0), 0)
            grad += ce_weight * (q - tl.where(is_y, 1.0, 0.0))
        tl.store(s_row + cols, grad.to(S.dtype.element_ty), mask=mask)
    if HAS_LABELS:
        value -= ce_weight * y_logq
    tl.store(Values + row, value)


def forward_kl_rows(student_logits: torch.Tensor, target_logits: torch.Tensor, labels: Optional[torch.Tensor],
                    ce_weight: float, student_weight_in_target: float = 0.0, block: Optional[int] = None):
    """(values [C] in the logits' dtype, gradient [C, V] = the student buffer overwritten); see the module doc."""
    n, v = student_logits.shape
    if target_logits.shape != (n, v) or student_logits.stride(-1) != 1 or target_logits.stride(-1) != 1:
        raise ValueError(f"forward_kl_rows: need two [C, V] buffers with contiguous rows, got "
                         f"{tuple(student_logits.shape)} / {tuple(target_logits.shape)}")
    values = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    has_labels = bool(ce_weight)
    if has_labels and labels is None:
        raise ValueError("forward_kl_rows: ce_weight > 0 needs labels")
    y = labels.long().contiguous() if has_labels else values  # an unused pointer without labels
    block_v = min(block or BLOCK, triton.next_power_of_2(v))
    if n:
        _forward_kl_rows[(n,)](student_logits, target_logits, y, values, v, student_logits.stride(0),
                               target_logits.stride(0), float(student_weight_in_target), float(ce_weight),
                               HAS_LABELS=has_labels, BLOCK_V=block_v, num_warps=NUM_WARPS)
    return values.to(student_logits.dtype), student_logits
