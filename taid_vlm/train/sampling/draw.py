"""One draw per row from a categorical distribution given by non-negative weights, by inverse CDF: ONE
uniform number per row (from that row's own generator). torch.multinomial draws one exponential variate
per vocabulary entry instead (the Gumbel/exponential trick): 151,936 random numbers per row and new token
for Qwen2's vocabulary, most of the cost of sampling at decode time on a CPU.

Two levels keep it cheap and exact up to float64 rounding: the weights are summed in blocks of BLOCK entries
(float64), the uniform picks a block by the blocks' running sums, then an entry inside that block by the
block's own running sum. An entry of weight 0 (cut by top-p, or exp underflow) is never drawn."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128  # divides Qwen2's 151,936 rows (and any multiple of 128): no padded copy


def draw_rows(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``[B]`` indices: row b's entry i with probability ``weights[b, i] / weights[b].sum()``, the entry at
    which the running sum of row b first exceeds ``uniforms[b] * weights[b].sum()``; ``weights`` ``[B, V]``
    (each row with a positive entry), ``uniforms`` ``[B]`` in [0, 1)."""
    rows, vocab = weights.shape
    blocks = (F.pad(weights, (0, -vocab % BLOCK)) if vocab % BLOCK else weights).reshape(rows, -1, BLOCK)
    running = blocks.sum(-1, dtype=torch.float64).cumsum(-1)                     # [B, blocks]
    # u < 1 keeps u * total strictly below the total (IEEE rounding to nearest): the block found has a positive sum
    target = uniforms.to(running).view(rows, 1) * running[:, -1:]
    block = torch.searchsorted(running, target, right=True)                      # [B, 1]
    below = torch.where(block > 0, running.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks.gather(1, block.unsqueeze(-1).expand(rows, 1, BLOCK)).squeeze(1)  # [B, BLOCK]
    entry = torch.searchsorted(inner.to(torch.float64).cumsum(-1), target - below, right=True)
    # the block's sum and its running sum may round apart: never past the block's last positive entry
    positions = torch.arange(BLOCK, device=weights.device)
    last = torch.where(inner > 0, positions, torch.zeros_like(positions)).amax(-1, keepdim=True)
    return (block * BLOCK + torch.minimum(entry, last)).squeeze(1)


def softmax_weights(scores: torch.Tensor) -> torch.Tensor:
    """exp(scores - max) per row, in fp32, in place where ``scores`` is already fp32: the softmax without
    its division (the draw normalises by the sum); -inf scores get weight 0."""
    x = scores.float()
    return x.sub_(x.amax(-1, keepdim=True)).exp_()
