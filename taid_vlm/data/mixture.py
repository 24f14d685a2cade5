"""Weighted mixtures of sources, as part of the one global sample order.

``data.train`` may list sources ``[{"shards": SPEC, "weight": w}, ...]``. Each source keeps its own
order (global_order.RawOrder over its shards: its own seeded shard rounds and block shuffle, seeded by
``(seed, source)``). The mixture deals global samples out in blocks of ``MIX_BLOCK``: in every block,
source ``k`` gets its largest-remainder share of ``MIX_BLOCK * w_k / sum(w)`` slots, placed by a
permutation seeded by ``(seed, block)``. Global sample ``i`` -> (block, slot) -> (source ``k``, its
``n``-th sample: ``block * share_k`` + the slots of ``k`` before this one in the block) -> the source's
own order -> (shard, raw sample). O(1) per sample, no state beyond the global position, the same on
every layout: resume, world-size invariance and per-rank reads work as for one source.

Epochs: a source is consumed at its share of the global rate and repeats its own rounds when it runs
out, independently of the others (a small source with a large weight is seen many times per pass of a
large one). A source with no raw sample at all is an error at start.
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

from .global_order import RawOrder

MIX_BLOCK = 1000


def largest_remainder(weights: Sequence[float], total: int) -> List[int]:
    """Integer shares of ``total`` proportional to ``weights`` (Hamilton's method; ties to the first)."""
    s = float(sum(weights))
    exact = [total * w / s for w in weights]
    shares = [int(x) for x in exact]
    by_rest = sorted(range(len(weights)), key=lambda k: (-(exact[k] - shares[k]), k))
    for k in by_rest[: total - sum(shares)]:
        shares[k] += 1
    return shares


class MixedOrder:
    """The global order over several sources; ``locate(i)`` -> (shard index in the concatenated shard
    list, raw sample in it), like RawOrder."""

    def __init__(self, seed: int, sources: Sequence[Tuple[RawOrder, int, float]]):
        """``sources``: (the source's own order, the index of its first shard in the shard list, weight)."""
        self.seed, self.sources = seed, list(sources)
        self.K = MIX_BLOCK
        self.shares = largest_remainder([w for _, _, w in self.sources], MIX_BLOCK)
        self.per_round = sum(o.per_round for o, _, _ in self.sources)
        self._blocks: Dict[int, List[Tuple[int, int]]] = {}

    def _block(self, b: int) -> List[Tuple[int, int]]:
        """Per slot of block ``b``: (source, its sample number within this block)."""
        if b not in self._blocks:
            if len(self._blocks) > 4:
                self._blocks.clear()
            slots = [k for k, n in enumerate(self.shares) for _ in range(n)]
            random.Random(f"mix:{self.seed}:{b}").shuffle(slots)
            seen = [0] * len(self.shares)
            out = []
            for k in slots:
                out.append((k, seen[k]))
                seen[k] += 1
            self._blocks[b] = out
        return self._blocks[b]

    def source_of(self, i: int) -> Tuple[int, int]:
        """Global sample ``i`` -> (source, index in that source's own order)."""
        b, p = divmod(i, MIX_BLOCK)
        k, n = self._block(b)[p]
        return k, b * self.shares[k] + n

    def locate(self, i: int) -> Tuple[int, int]:
        k, n = self.source_of(i)
        order, first, _ = self.sources[k]
        s, j = order.locate(n)
        return first + s, j

    locate_raw = locate  # the filler search walks global samples in order

    def errors_between(self, lo: int, hi: int) -> List[Tuple[int, str]]:
        """Each source's read errors over the part of its own stream that global samples [lo, hi) use
        (counted at its own rate)."""
        out = []
        for k, (order, first, _) in enumerate(self.sources):
            a, b = self._count_before(k, lo), self._count_before(k, hi)
            out += [(first + s, reason) for s, reason in order.errors_between(a, b)]
        return out

    def _count_before(self, k: int, i: int) -> int:
        b, p = divmod(i, MIX_BLOCK)
        return b * self.shares[k] + sum(1 for kk, _ in self._block(b)[:p] if kk == k)
