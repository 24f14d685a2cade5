"""Teacher rows with -inf logits where the student has mass: rkl and akl leave those reverse-KL terms
out (as the reference code masks them), dkd takes NCKD as 0 for a teacher row that allows only the
label. Value and gradient are finite and equal the float64 reference, on the plain and the chunked path."""

import math

import numpy as np
import pytest
import torch

from taid_vlm.losses import LOSS_NAMES, LogitsTeacher, build_loss
from tests.loss_reference import masked_mean
from tests.test_losses import make_batch, numeric_gradient


def label_only_rows(zt, y, rows):
    """Ban every teacher entry but the label on the given rows."""
    zt = zt.copy()
    for i in rows:
        keep = zt[i, y[i]]
        zt[i, :] = -np.inf
        zt[i, y[i]] = keep
    return zt


def hard_batch(seed):
    """Teacher-only bans (30 %), and two rows where the teacher allows only the label."""
    zs, zt, y, mask = make_batch(n=6, v=7, seed=seed, banned=0.0, teacher_only_banned=0.3)
    mask[:] = True
    mask[4] = False  # a masked-out row may hold anything
    return zs, label_only_rows(zt, y, rows=(1, 4)), y, mask


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_plain_value_and_gradient_finite_and_equal_reference(name):
    zs, zt, y, mask = hard_batch(seed=21)
    s = torch.tensor(zs, requires_grad=True)
    value = build_loss(name)(s, torch.tensor(zt), torch.tensor(mask), torch.tensor(y))
    value.backward()
    expected = masked_mean(name, zs, zt, y, mask)
    assert math.isfinite(value.item()) and math.isfinite(expected)
    assert abs(value.item() - expected) <= 1e-10 * max(abs(expected), 1.0)
    assert torch.isfinite(s.grad).all()
    np.testing.assert_allclose(s.grad.numpy(), numeric_gradient(name, zs, zt, y, mask), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["rkl", "akl", "dkd", "fkl", "taid"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_chunked_path_equals_plain_path_and_reference(name, chunk_size):
    """The chunked path (rkl: closed form; akl, dkd: autograd per chunk) with the same teacher logits."""
    zs, zt, y, mask = hard_batch(seed=23)
    g = torch.Generator().manual_seed(0)
    n, v = zs.shape
    w = torch.randn(v, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t, m, labels = torch.tensor(zt), torch.tensor(mask), torch.tensor(y)
    loss = build_loss(name, ce_weight=0.25)
    plain = loss(h @ w.T, t, m, labels)
    g_plain = torch.autograd.grad(plain, [h, w])
    fused = loss.fused(h, w, LogitsTeacher(t), mask=m, labels=labels, chunk_size=chunk_size)
    g_fused = torch.autograd.grad(fused, [h, w])
    zs_used = (h @ w.T).detach().numpy()
    expected = masked_mean(name, zs_used, zt, y, mask) + 0.25 * masked_mean("ce", zs_used, zt, y, mask)
    assert torch.isfinite(fused) and abs(fused.item() - expected) <= 1e-10 * abs(expected)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_fused, g_plain):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_rkl_closed_form_float32_with_bans_matches_float64():
    zs, zt, y, mask = hard_batch(seed=25)
    g = torch.Generator().manual_seed(1)
    n, v = zs.shape
    h64 = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(v, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h32 = h64.detach().float().requires_grad_(True)
    w32 = w64.detach().float().requires_grad_(True)
    loss = build_loss("rkl")
    ref = loss.fused(h64, w64, LogitsTeacher(torch.tensor(zt)), mask=torch.tensor(mask), chunk_size=3)
    out = loss.fused(h32, w32, LogitsTeacher(torch.tensor(zt).float()), mask=torch.tensor(mask), chunk_size=3)
    g64, g32 = torch.autograd.grad(ref, [h64, w64]), torch.autograd.grad(out, [h32, w32])
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_rkl_leaves_out_exactly_the_teacher_banned_terms():
    """The convention, written out: sum over the teacher-allowed entries of q (log q - log p)."""
    zs = torch.tensor([[0.3, -1.2, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    zt = torch.tensor([[1.0, -math.inf, 0.2, -math.inf]], dtype=torch.float64)
    value = build_loss("rkl")(zs, zt, torch.tensor([True]))
    logq, logp = torch.log_softmax(zs.detach(), -1), torch.log_softmax(zt, -1)
    allowed = [0, 2]
    expected = (logq.exp()[0, allowed] * (logq[0, allowed] - logp[0, allowed])).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)


def test_dkd_label_only_teacher_row_is_tckd_only():
    zs = torch.tensor([[0.3, -1.2, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    zt = torch.tensor([[-math.inf, 3.0, -math.inf, -math.inf]], dtype=torch.float64)
    y = torch.tensor([1])
    value = build_loss("dkd", alpha=1.0, beta=0.5)(zs, zt, torch.tensor([True]), y)
    value.backward()
    q_y = torch.softmax(zs.detach(), -1)[0, 1]
    assert value.item() == pytest.approx(-math.log(q_y.item()), rel=1e-12)  # KL([1, 0] || [q_y, 1 - q_y])
    assert torch.isfinite(zs.grad).all()
