"""Float64 NumPy references for every loss, written straight from the formulas (no shared code with
taid_vlm.losses). Each returns the per-token values for one batch of logits [N, V].

`frozen` holds the student logits used by the parts that the real loss detaches (TAID's target, AKL's
weights), so finite differences of these references give the gradient the loss must produce.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    top = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
    e = np.exp(z - top)
    return e / e.sum(-1, keepdims=True)


def kl(p, q, skip=None):
    """KL(p || q) per row; entries where ``skip`` is true are left out of the sum (default: none)."""
    out = np.zeros(p.shape[0])
    for i in range(p.shape[0]):
        for v in range(p.shape[1]):
            if p[i, v] > 0 and (skip is None or not skip[i, v]):
                out[i] += p[i, v] * (math.log(p[i, v]) - math.log(q[i, v]) if q[i, v] > 0 else math.inf)
    return out


def teacher_banned(zt):
    """The convention of the reference code (DistiLLM / TAID reverse_kl): reverse-KL terms on tokens the
    teacher bans (logit -inf) are masked out instead of being +inf."""
    return np.isneginf(np.asarray(zt))


def fkl(zs, zt, y, frozen):
    return kl(softmax(zt), softmax(zs))


def rkl(zs, zt, y, frozen):
    return kl(softmax(zs), softmax(zt), skip=teacher_banned(zt))


def tvd(zs, zt, y, frozen):
    return 0.5 * np.abs(softmax(zt) - softmax(zs)).sum(-1)


def gjsd(zs, zt, y, frozen, beta=0.1):
    p, q = softmax(zt), softmax(zs)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def sfkl(zs, zt, y, frozen, skew=0.1):
    p, q = softmax(zt), softmax(zs)
    return kl(p, skew * p + (1 - skew) * q)


def srkl(zs, zt, y, frozen, skew=0.1):
    p, q = softmax(zt), softmax(zs)
    return kl(q, (1 - skew) * p + skew * q)


def akl(zs, zt, y, frozen, mu=0.5):
    p, q, q_frozen = softmax(zt), softmax(zs), softmax(frozen)
    out = np.zeros(p.shape[0])
    for i in range(p.shape[0]):
        order = np.argsort(-p[i], kind="stable")
        cum, head, tail = 0.0, 0.0, 0.0
        for rank, v in enumerate(order):
            cum += p[i, v]
            gap = abs(p[i, v] - q_frozen[i, v])
            if rank == 0 or cum <= mu:
                head += gap
            else:
                tail += gap
        w_head = head / (head + tail) if head + tail > 0 else 0.5
        rkl_i = kl(q[i : i + 1], p[i : i + 1], skip=teacher_banned(zt[i : i + 1]))[0]
        out[i] = w_head * kl(p[i : i + 1], q[i : i + 1])[0] + (1 - w_head) * rkl_i
    return out


def dkd(zs, zt, y, frozen, alpha=1.0, beta=0.5, temperature=1.0):
    p, q = softmax(zt / temperature), softmax(zs / temperature)
    out = np.zeros(p.shape[0])
    for i in range(p.shape[0]):
        g = int(y[i])
        bp, bq = np.array([[p[i, g], 1 - p[i, g]]]), np.array([[q[i, g], 1 - q[i, g]]])
        rest = [v for v in range(p.shape[1]) if v != g]
        qr = q[i, rest] / q[i, rest].sum()
        if p[i, rest].sum() > 0:
            nckd = kl((p[i, rest] / p[i, rest].sum())[None], qr[None])[0]
        else:  # the teacher allows only the target: no non-target distribution, NCKD taken as 0
            nckd = 0.0
        out[i] = temperature**2 * (alpha * kl(bp, bq)[0] + beta * nckd)
    return out


def ctkd_temperature(t_min=1.0, t_max=21.0, logit=1.0):
    return t_min + (t_max - t_min) / (1.0 + math.exp(-logit))


def ctkd(zs, zt, y, frozen, temperature=None):
    temp = ctkd_temperature() if temperature is None else temperature
    return temp**2 * kl(softmax(zt / temp), softmax(zs / temp))


def ce(zs, zt, y, frozen):
    q = softmax(zs)
    return np.array([-math.log(q[i, int(y[i])]) for i in range(q.shape[0])])


def taid(zs, zt, y, frozen, t=0.4):
    z_target = (1 - t) * frozen + t * zt if 0 < t < 1 else (frozen if t == 0 else zt)
    return kl(softmax(z_target), softmax(zs))


REFERENCES = {
    "taid": taid,
    "taid_linear": taid,
    "fkl": fkl,
    "rkl": rkl,
    "tvd": tvd,
    "gjsd": gjsd,
    "sfkl": sfkl,
    "srkl": srkl,
    "akl": akl,
    "ctkd": ctkd,
    "dkd": dkd,
    "ce": ce,
}


def masked_mean(name, zs, zt, y, mask, frozen=None, **kwargs):
    frozen = zs if frozen is None else frozen
    keep = np.asarray(mask, dtype=bool)
    if not keep.any():
        return 0.0
    values = REFERENCES[name](zs[keep], zt[keep], None if y is None else y[keep], frozen[keep], **kwargs)
    return float(values.mean())


# ---- inputs of the chunked lm_head path (hidden states and lm_head weights) -------------------

N, H_S, H_T, V = 23, 6, 9, 17


def lm_head_inputs(seed=0, dtype=torch.float64):
    """Student hidden [N, H_S] and weight [V, H_S] (requiring grad), teacher hidden and weight, a random
    mask [N] and labels [N]; deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H_S, generator=g, dtype=dtype, requires_grad=True)
    ws = torch.randn(V, H_S, generator=g, dtype=dtype, requires_grad=True)
    ht = torch.randn(N, H_T, generator=g, dtype=dtype)
    wt = torch.randn(V, H_T, generator=g, dtype=dtype)
    mask = torch.rand(N, generator=g) < 0.75
    labels = torch.randint(0, V, (N,), generator=g)
    return hs, ws, ht, wt, mask, labels
