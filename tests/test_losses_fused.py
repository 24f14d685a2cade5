"""The chunked lm_head + loss path against the plain path: same value, same gradients."""

import pytest
import torch

from taid_vlm.losses import LOSS_NAMES, LogitsTeacher, OnlineTeacher, build_loss
from taid_vlm.losses.chunked import default_chunk_size

from tests.loss_reference import N, V
from tests.loss_reference import lm_head_inputs as inputs


def grads_of(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, N, 64, None])
def test_fused_equals_unfused_value_and_gradients(name, chunk_size):
    hs, ws, ht, wt, mask, labels = inputs(seed=len(name))
    loss = build_loss(name, **({"ce_weight": 0.3} if name != "ce" else {})).double()
    params = list(loss.parameters())
    plain = loss(hs @ ws.T, ht @ wt.T, mask, labels)
    g_plain = grads_of(plain, [hs, ws, *params])
    fused = loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, labels=labels, chunk_size=chunk_size)
    g_fused = grads_of(fused, [hs, ws, *params])
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert (g_fused[0][~mask] == 0).all()


@pytest.mark.parametrize("name", ["taid", "fkl", "rkl", "akl"])
def test_fused_float32_and_precomputed_teacher_logits(name):
    hs, ws, ht, wt, mask, labels = inputs(dtype=torch.float32, seed=3)
    loss = build_loss(name)
    plain = loss(hs @ ws.T, ht @ wt.T, mask, labels)
    g_plain = grads_of(plain, [hs, ws])
    fused = loss.fused(hs, ws, LogitsTeacher(ht @ wt.T), mask=mask, chunk_size=5)
    g_fused = grads_of(fused, [hs, ws])
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_bf16_weights_close_to_float32():
    """bf16 model: logits in bf16 matmul, loss in float32, weight gradient accumulated in float32."""
    hs, ws, ht, wt, mask, _ = inputs(dtype=torch.float32, seed=5)
    loss = build_loss("taid")
    ref = loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, chunk_size=4)
    g_ref = grads_of(ref, [hs, ws])
    hb, wb = hs.detach().bfloat16().requires_grad_(), ws.detach().bfloat16().requires_grad_()
    got = loss.fused(hb, wb, OnlineTeacher(ht.bfloat16(), wt.bfloat16()), mask, chunk_size=4)
    g_got = grads_of(got, [hb, wb])
    assert got.dtype == torch.float32 and g_got[0].dtype == torch.bfloat16 and g_got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


def test_fused_with_frozen_lm_head_only_returns_hidden_gradient():
    hs, ws, ht, wt, mask, _ = inputs(seed=7)
    w_frozen = ws.detach()
    value = build_loss("fkl").fused(hs, w_frozen, OnlineTeacher(ht, wt), mask, chunk_size=3)
    (g,) = grads_of(value, [hs])
    plain = build_loss("fkl")(hs @ w_frozen.T, ht @ wt.T, mask)
    torch.testing.assert_close(g, grads_of(plain, [hs])[0], rtol=1e-10, atol=1e-13)


def test_fused_gradient_scales_with_upstream_gradient():
    hs, ws, ht, wt, mask, _ = inputs(seed=9)
    loss = build_loss("taid")
    (g1,) = grads_of(loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, chunk_size=5), [hs])
    (g3,) = grads_of(3.0 * loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, chunk_size=5), [hs])
    torch.testing.assert_close(g3, 3.0 * g1, rtol=1e-12, atol=0)


def test_fused_empty_mask_is_zero_with_zero_gradients():
    hs, ws, ht, wt, _, _ = inputs(seed=11)
    value = build_loss("taid").fused(hs, ws, OnlineTeacher(ht, wt), torch.zeros(N, dtype=torch.bool))
    g_h, g_w = grads_of(value, [hs, ws])
    assert value.item() == 0.0 and (g_h == 0).all() and (g_w == 0).all()


def test_fused_mismatches_are_clear_errors():
    hs, ws, ht, wt, mask, _ = inputs(seed=13)
    loss = build_loss("fkl")
    with pytest.raises(ValueError, match="vocabulary mismatch: student lm_head has 17 rows, teacher lm_head has 16"):
        loss.fused(hs, ws, OnlineTeacher(ht, wt[:16]), mask)
    with pytest.raises(ValueError, match="student_hidden has 6 features"):
        loss.fused(hs, torch.randn(V, 5, dtype=hs.dtype), OnlineTeacher(ht, wt), mask)
    with pytest.raises(ValueError, match="teacher_hidden shape .* does not match 23 student tokens"):
        loss.fused(hs, ws, OnlineTeacher(ht[:5], wt), mask)
    with pytest.raises(ValueError, match=r"^fkl: needs a teacher \(a TeacherSource"):
        loss.fused(hs, ws, mask=mask)
    with pytest.raises(TypeError, match="^fkl: teacher must be a TeacherSource .*got Tensor$"):
        loss.fused(hs, ws, ht, mask)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, chunk_size=0)


def test_ce_fused_needs_no_teacher():
    hs, ws, _, _, mask, labels = inputs(seed=15)
    loss = build_loss("ce")
    torch.testing.assert_close(loss.fused(hs, ws, mask=mask, labels=labels), loss(hs @ ws.T, None, mask, labels))


def test_default_chunk_size_bounds():
    assert default_chunk_size(4096, 151_936) == 216
    assert default_chunk_size(10, 151_936) == 10
    assert default_chunk_size(100_000, 512) == 65536
    assert default_chunk_size(100_000, 10**9) == 8
    assert default_chunk_size(3, 10**9) == 3
    assert default_chunk_size(4096, 151_936, torch.device("cpu")) == 104  # half the rows on a CPU
    assert default_chunk_size(4096, 151_936, torch.device("meta")) == 216
    assert default_chunk_size(32_768, 151_936, torch.device("cuda")) == 1760  # tensor cores want tall chunks


@pytest.mark.parametrize("name,kwargs", [(n, {}) for n in LOSS_NAMES]
                         + [("taid", {"t_start": 0.0}), ("taid", {"t_start": 1.0}), ("taid_linear", {"t_start": 0.7})])
def test_fused_with_banned_teacher_entries(name, kwargs):
    """Precomputed teacher logits with -inf entries (rkl/akl mask those terms out: finite, as the plain path)."""
    hs, ws, ht, wt, mask, labels = inputs(seed=17)
    t_logits = ht @ wt.T
    banned = torch.rand(t_logits.shape, generator=torch.Generator().manual_seed(1)) < 0.2
    banned[torch.arange(N), labels] = False
    t_logits = t_logits.masked_fill(banned, float("-inf"))
    loss = build_loss(name, **kwargs, **({"ce_weight": 0.5} if name != "ce" else {})).double()
    plain = loss(hs @ ws.T, t_logits, mask, labels)
    g_plain = grads_of(plain, [hs, ws])
    fused = loss.fused(hs, ws, LogitsTeacher(t_logits), mask=mask, labels=labels, chunk_size=6)
    g_fused = grads_of(fused, [hs, ws])
    assert torch.isfinite(fused)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
