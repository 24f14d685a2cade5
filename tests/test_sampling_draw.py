"""The inverse-CDF draw of sampled generation (train/sampling/draw.py): the same entry as the one-level
reference (a float64 running sum over the whole row, searched for u * total), the softmax's frequencies,
never an entry of weight 0, and the sampler in `generate` equal to a plain per-token loop over the same
uniform numbers."""

from __future__ import annotations

import pytest
import torch

from taid_vlm.train.sampling.draw import BLOCK, draw_rows, softmax_weights
from taid_vlm.train.sampling.generation import RowSeededSampler


def reference_draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The textbook inverse CDF: the first entry whose running sum exceeds u * total."""
    running = weights.double().cumsum(-1)
    target = uniforms.double().unsqueeze(1) * running[:, -1:]
    return torch.searchsorted(running, target, right=True).squeeze(1)


@pytest.mark.parametrize("vocab", [7, BLOCK, 3 * BLOCK + 5, 151_936])
def test_the_two_level_draw_is_the_one_level_inverse_cdf(vocab):
    gen = torch.Generator().manual_seed(vocab)
    weights = softmax_weights(torch.randn(64, vocab, generator=gen) * 4)
    weights[:, ::3] = 0.0  # entries cut by top-p
    weights[:, 1] = 1.0    # every row keeps a positive entry
    uniforms = torch.rand(64, generator=gen, dtype=torch.float64)
    uniforms[:4] = torch.tensor([0.0, 1e-12, 0.5, 1 - 2**-53], dtype=torch.float64)  # the ends of [0, 1)
    got = draw_rows(weights, uniforms)
    assert torch.equal(got, reference_draw(weights, uniforms))
    assert bool((weights.gather(1, got.unsqueeze(1)) > 0).all())


def test_the_largest_uniform_stays_on_an_entry_of_positive_weight():
    weights = torch.zeros(3, 3 * BLOCK)
    weights[0, 10], weights[1, BLOCK + 3] = 1e-30, 2.0  # the rest (whole blocks at the end included) is 0
    # a block whose float64 sum (1 + 2.7e-15, summed in another order) exceeds its running sum (1.0)
    weights[2, BLOCK:2 * BLOCK] = 1e-17
    weights[2, BLOCK] = 1.0
    picks = draw_rows(weights, torch.full((3,), 1 - 2**-53, dtype=torch.float64))
    assert picks.tolist()[:2] == [10, BLOCK + 3]
    assert BLOCK <= picks[2] < 2 * BLOCK  # inside that block: an entry of weight 1e-17, not past its end


def test_draws_follow_the_softmax_at_the_temperature():
    scores = torch.tensor([[2.0, 0.5, -1.0, 1.0, float("-inf"), 0.0]])
    n, temperature = 40_000, 0.7
    weights = softmax_weights(scores.expand(n, -1) / temperature)
    picks = draw_rows(weights, torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    freq = torch.bincount(picks, minlength=6).double() / n
    want = torch.softmax(scores[0].double() / temperature, -1)
    assert freq[4] == 0  # -inf: weight 0
    assert torch.allclose(freq, want, atol=4 * (want * (1 - want) / n).sqrt().max().item())


def test_the_sampler_picks_what_a_plain_per_row_loop_picks():
    """RowSeededSampler (batched, one uniform per row from its own generator) against row by row: softmax
    of scores / T in float64, the running sum searched for that row's uniform."""
    scores = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)) * 3
    seeds = [11, 12, 13]
    sampler = RowSeededSampler([torch.Generator().manual_seed(s) for s in seeds], temperature=0.9, top_p=1.0)
    ids = torch.zeros(3, 4, dtype=torch.long)
    got = [sampler(ids, scores.clone()).argmax(-1).tolist() for _ in range(5)]
    plain = [torch.Generator().manual_seed(s) for s in seeds]
    want = [[int(reference_draw(torch.softmax(scores[b:b + 1].double() / 0.9, -1),
                                torch.rand((1,), generator=plain[b], dtype=torch.float64)))
             for b in range(3)] for _ in range(5)]
    assert got == want
    out = sampler(ids, scores.clone())
    assert bool((torch.isfinite(out).sum(-1) == 1).all())  # only the drawn token is left for greedy
