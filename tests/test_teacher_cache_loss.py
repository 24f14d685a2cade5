"""Cached top-k teacher in the chunked loss: k = V is the online loss exactly; k < V is the documented
tail-uniform approximation (checked against a dense reference) and its error against the online loss is
reported."""

import math

import pytest
import torch

from taid_vlm.losses import LOSS_NAMES, CachedTopKTeacher, LogitsTeacher, OnlineTeacher, build_loss
from taid_vlm.losses.chunked import topk_log_probs_into

from tests.loss_reference import N, V
from tests.loss_reference import lm_head_inputs as inputs


def topk_of(logits: torch.Tensor, k: int):
    """What the cache stores (before 16-bit rounding): top-k log-probs, their ids, log of the rest."""
    logp = torch.log_softmax(logits, -1)
    values, ids = logp.topk(k, -1)
    rest = logp.scatter(1, ids, float("-inf"))
    return {"ids": ids.to(torch.int32), "logprobs": values, "log_tail": torch.logsumexp(rest, -1)}


def grads_of(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True)


def _loss(name):
    return build_loss(name, **({"ce_weight": 0.3} if name != "ce" else {})).double()


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("chunk_size", [4, None])
def test_k_equals_vocab_is_the_online_loss(name, chunk_size):
    hs, ws, ht, wt, mask, labels = inputs(seed=len(name))
    loss = _loss(name)
    params = list(loss.parameters())
    online = loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, labels=labels, chunk_size=chunk_size)
    g_online = grads_of(online, [hs, ws, *params])
    cached = loss.fused(hs, ws, CachedTopKTeacher.from_batch("topk", topk_of(ht @ wt.T, V)), mask=mask, labels=labels,
                        chunk_size=chunk_size)
    g_cached = grads_of(cached, [hs, ws, *params])
    torch.testing.assert_close(cached, online, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_cached, g_online):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["taid", "fkl", "rkl", "tvd", "akl", "dkd"])
@pytest.mark.parametrize("k", [1, 5])
def test_k_below_vocab_is_the_tail_uniform_teacher(name, k):
    """The chunked path equals the plain loss on the dense reconstruction: top-k log-probs + the tail
    mass spread over the other V - k tokens."""
    hs, ws, ht, wt, mask, labels = inputs(seed=3)
    topk = topk_of(ht @ wt.T, k)
    dense = topk_log_probs_into(torch.empty(N, V, dtype=torch.float64), *topk.values())
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(N, dtype=torch.float64), rtol=1e-12, atol=0)
    loss = _loss(name)
    plain = loss(hs @ ws.T, dense, mask, labels)
    g_plain = grads_of(plain, [hs, ws])
    cached = loss.fused(hs, ws, CachedTopKTeacher.from_batch("topk", topk), mask=mask, labels=labels, chunk_size=5)
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads_of(cached, [hs, ws]), g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_float16_log_probs_and_int32_ids_at_k_equals_vocab():
    """The stored form (int32 ids, float16 log-probs): the loss equals the online loss on the 16-bit
    rounded teacher log-probs, and is close to the unrounded one."""
    hs, ws, ht, wt, mask, labels = inputs(seed=5, dtype=torch.float32)
    topk = topk_of(ht @ wt.T, V)
    stored = {**topk, "logprobs": topk["logprobs"].half()}
    loss = build_loss("taid")
    rounded = torch.zeros(N, V).scatter_(1, topk["ids"].long(), stored["logprobs"].float())
    ref = loss.fused(hs, ws, LogitsTeacher(rounded), mask=mask, chunk_size=4)
    got = loss.fused(hs, ws, CachedTopKTeacher.from_batch("topk", stored), mask=mask, chunk_size=4)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    online = loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, chunk_size=4)
    assert abs(float(got) - float(online)) < 1e-3 * float(online)


def test_banned_teacher_entries_and_empty_tail():
    """-inf teacher logits (banned tokens) give an empty tail; the loss stays finite and exact."""
    hs, ws, ht, wt, mask, labels = inputs(seed=7)
    t_logits = ht @ wt.T
    t_logits[:, 4:] = float("-inf")  # only 4 allowed tokens per row
    topk = topk_of(t_logits, 4)
    assert torch.isneginf(topk["log_tail"]).all()
    loss = build_loss("taid").double()
    torch.testing.assert_close(loss.fused(hs, ws, CachedTopKTeacher.from_batch("topk", topk), mask=mask, chunk_size=3),
                               loss.fused(hs, ws, LogitsTeacher(t_logits), mask=mask, chunk_size=3), rtol=1e-12, atol=0)


def test_topk_input_errors():
    hs, ws, ht, wt, mask, labels = inputs(seed=9)
    topk = topk_of(ht @ wt.T, 3)
    loss = build_loss("fkl")
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        loss.fused(hs, ws[:10], CachedTopKTeacher.from_batch("topk", topk), mask=mask)
    with pytest.raises(ValueError, match=r"ids \[N, k\]"):
        loss.fused(hs, ws, CachedTopKTeacher.from_batch("topk", {**topk, "log_tail": topk["log_tail"][:3]}), mask=mask)
    with pytest.raises(ValueError, match="lacks"):
        loss.fused(hs, ws, CachedTopKTeacher.from_batch("topk", {"ids": topk["ids"]}), mask=mask)


def zipf_teacher(n, v, seed, temperature):
    """Peaked, LM-like teacher logits: a Zipf-shaped distribution over a random permutation of the vocab."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(n, v, generator=g), -1).float() + 1.0
    return -torch.log(ranks) / temperature + 0.3 * torch.randn(n, v, generator=g)


@pytest.mark.parametrize("name", ["fkl", "taid", "rkl"])
def test_k64_error_vs_online_is_reported(name, record_property):
    """k = 64 of V = 4096 on a peaked (Zipf) teacher, float16 log-probs: relative error of the value and
    the gradient vs the online loss. Forward KL only sees the tail through its mass (error ~ tail mass);
    TAID at t = 0.4 (a geometric mix q^0.6 p^0.4) and reverse KL weigh log p where the STUDENT has mass,
    so the flattened tail costs them much more. More k must shrink every error."""
    n, h, v = 64, 64, 4096
    g = torch.Generator().manual_seed(0)
    hs = (0.5 * torch.randn(n, h, generator=g, dtype=torch.float64)).requires_grad_()
    ws = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5).requires_grad_()
    t_logits = zipf_teacher(n, v, 1, temperature=0.5).double()
    loss = build_loss(name).double()
    online = loss.fused(hs, ws, LogitsTeacher(t_logits), mask=None)
    g_on = grads_of(online, [hs, ws])
    errors = {}
    for k in (64, 256):
        topk = topk_of(t_logits, k)
        topk["logprobs"] = topk["logprobs"].half()
        cached = loss.fused(hs, ws, CachedTopKTeacher.from_batch("topk", topk), mask=None)
        g_ca = grads_of(cached, [hs, ws])
        rel = abs(float(cached) - float(online)) / float(online)
        grad_rel = max(float((a - b).norm() / b.norm()) for a, b in zip(g_ca, g_on))
        mass = float(topk["logprobs"].double().exp().sum(-1).mean())
        errors[k] = (rel, grad_rel)
        print(f"\n{name}: k={k} of V={v}, top-k mass {mass:.3f}: value {float(online):.4f} online, "
              f"{float(cached):.4f} cached (rel {rel:.2e}), gradient rel {grad_rel:.2e}")
        record_property(f"k{k}_rel_value_error", rel)
        record_property(f"k{k}_rel_grad_error", grad_rel)
    assert all(math.isfinite(x) for e in errors.values() for x in e)
    assert errors[256][0] < errors[64][0] and errors[256][1] < errors[64][1]
    if name == "fkl":
        assert errors[64][0] < 0.01 and errors[64][1] < 0.01
