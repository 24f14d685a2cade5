"""The chunked loss with an external denominator: micro-batches summed over one global token count give
the value and gradients of the mean over all their tokens at once (what the trainer relies on for
world-size invariance)."""

import pytest
import torch

from taid_vlm.losses import LOSS_NAMES, OnlineTeacher, build_loss

from tests.loss_reference import lm_head_inputs as inputs


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_parts_over_the_global_count_equal_the_mean_over_all_tokens(name):
    hs, ws, ht, wt, mask, labels = inputs(seed=len(name))
    loss = build_loss(name, **({"ce_weight": 0.3} if name != "ce" else {})).double()
    params = list(loss.parameters())
    whole = loss.fused(hs, ws, OnlineTeacher(ht, wt), mask, labels=labels, chunk_size=3)
    g_whole = torch.autograd.grad(whole, [hs, ws, *params], allow_unused=True)
    n = hs.shape[0]
    cuts = [0, n // 3, n // 3 + 1, n]  # uneven parts, one of a single row
    total = int(mask.sum())
    parts = [loss.fused(hs[a:b], ws, OnlineTeacher(ht[a:b], wt), mask[a:b], labels=labels[a:b], chunk_size=3,
                        denominator=total)
             for a, b in zip(cuts, cuts[1:])]
    summed = sum(parts)
    g_parts = torch.autograd.grad(summed, [hs, ws, *params], allow_unused=True)
    torch.testing.assert_close(summed, whole, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_parts, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_denominator_must_be_positive():
    hs, ws, ht, wt, mask, labels = inputs(seed=1)
    with pytest.raises(ValueError, match="denominator must be > 0"):
        build_loss("fkl").double().fused(hs, ws, OnlineTeacher(ht, wt), mask, denominator=0)
