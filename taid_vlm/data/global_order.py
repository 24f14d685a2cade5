"""One global sample order for training, the same for every world size and worker count.

The order. Raw samples (undecoded) are read in rounds; a round is a permutation of ALL shards, seeded
by (seed, round). The resulting endless sequence of raw samples is cut into blocks of ``K``
(the shuffle buffer) and each block is permuted by an RNG seeded by (seed, block). The i-th sample of
that shuffled sequence is global sample ``i``. Nothing in it depends on ranks or workers.

The slicing. Optimizer step ``k`` (counted from an ``origin``, the global position where this run
started or resumed) consumes global samples ``[origin + k*Bg, origin + (k+1)*Bg)`` with
``Bg = micro_batch * grad_accum * world_size``. Inside a step, rank ``r`` takes the contiguous slice
``r*Br .. (r+1)*Br`` (``Br = micro_batch * grad_accum``) and its micro-batch ``m`` the ``m``-th
``micro_batch`` samples of that slice. So a step sees the same samples whatever the world size;
only their grouping into micro-batches differs. A rank's ``n``-th micro-batch is produced by its
DataLoader worker ``n % num_workers``.

Slots are counted in RAW samples: a sample that turns out to be unusable (corrupt, too long) leaves
its slot empty and its micro-batch one sample smaller, on every world size alike (a micro-batch whose
samples were all unusable still runs, with zero supervised tokens). Deciding usability before slicing
would need every worker to decode every sample.

The reads. With the shard index (shard_index.py: raw samples per shard), global sample ``i`` maps to a
place without reading anything: block ``b = i // K`` -> raw position ``q = b*K + perm_b[i % K]`` in the
concatenated rounds -> round ``q // T`` (``T`` raw samples per round) -> shard and sample ``j`` in it
(``RawOrder.locate``). Each worker reads only its own samples' bytes (seek + read of their byte range),
so each shard byte is read about once over all ranks and workers.

The position. A single global counter (the next global sample) is the whole resumable state: any world
size, worker count, micro-batch size or accumulation can continue from it.

Shard read errors (a cut tar, a file that is not a tar) sit at raw positions too (the index records how
many samples a shard yielded before each), and are counted once, by rank 0's first worker, when the
stream passes them, as a full walk of the stream would meet them.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple


def shard_round_order(seed: int, round_index: int, num_shards: int) -> List[int]:
    """The shard permutation of one round (the same for everyone)."""
    order = list(range(num_shards))
    random.Random(f"shards:{seed}:{round_index}").shuffle(order)
    return order


def block_permutation(seed: int, block: int, size: int) -> List[int]:
    """``perm[p]`` = offset inside the block of the raw sample at shuffled position ``p``."""
    perm = list(range(size))
    if size > 1:
        random.Random(f"block:{seed}:{block}").shuffle(perm)
    return perm


class Slot(NamedTuple):
    n: int  # the rank's micro-batch index, counted from the origin
    start: int  # first global sample of the micro-batch
    stop: int  # one past its last global sample
    step_start: int  # first global sample of its optimizer step


@dataclass(frozen=True)
class Layout:
    """How global samples are grouped into micro-batches, ranks and optimizer steps."""

    micro_batch: int
    grad_accum: int
    world_size: int

    def __post_init__(self):
        for name in ("micro_batch", "grad_accum", "world_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def per_step(self) -> int:
        return self.per_rank * self.world_size

    def slot(self, origin: int, rank: int, n: int) -> Slot:
        step, m = divmod(n, self.grad_accum)
        step_start = origin + step * self.per_step
        start = step_start + rank * self.per_rank + m * self.micro_batch
        return Slot(n, start, start + self.micro_batch, step_start)

    def worker_slots(self, origin: int, rank: int, worker: int, num_workers: int, first_n: int) -> Iterator[Slot]:
        """The slots of one DataLoader worker, in order: micro-batches ``n >= first_n`` with
        ``n % num_workers == worker``."""
        n = first_n + (worker - first_n) % num_workers
        while True:
            yield self.slot(origin, rank, n)
            n += num_workers

    def position_after(self, origin: int, handed: int) -> dict:
        """``{"position", "micro"}`` after ``handed`` micro-batches: the start of the current step and
        how many of this rank's micro-batches of it were already handed out."""
        step, micro = divmod(handed, self.grad_accum)
        return {"position": origin + step * self.per_step, "micro": micro}

    def as_dict(self) -> dict:
        return {"micro_batch": self.micro_batch, "grad_accum": self.grad_accum, "world_size": self.world_size}


class RawOrder:
    """Global sample index -> (shard, raw sample in it), from the samples per shard alone.

    ``counts[s]``: raw samples of shard ``s``; ``errors[s]``: its read errors as (reason, samples before)."""

    def __init__(self, seed: int, shuffle_buffer: int, counts: Sequence[int],
                 errors: Sequence[Sequence[Tuple[str, int]]] = ()):
        self.seed, self.K = seed, max(1, int(shuffle_buffer))
        self.counts = [int(c) for c in counts]
        self.per_round = sum(self.counts)
        self.errors = {s: list(e) for s, e in enumerate(errors) if e}
        self._rounds: Dict[int, Tuple[List[int], List[int], Dict[int, int]]] = {}
        self._blocks: Dict[int, List[int]] = {}

    def _round(self, r: int) -> Tuple[List[int], List[int], Dict[int, int]]:
        """The shard order of round ``r``, the raw position (in the round) where each of its shards
        starts, and where the shards with read errors sit in the order."""
        if r not in self._rounds:
            if len(self._rounds) > 4:
                self._rounds.clear()
            order = shard_round_order(self.seed, r, len(self.counts))
            starts = [0] + list(itertools.accumulate(self.counts[s] for s in order))
            self._rounds[r] = (order, starts, {s: k for k, s in enumerate(order) if s in self.errors})
        return self._rounds[r]

    def raw_position(self, i: int) -> int:
        """Where global sample ``i`` sits in the concatenated rounds (the block shuffle undone)."""
        b, p = divmod(i, self.K)
        if b not in self._blocks:
            if len(self._blocks) > 4:
                self._blocks.clear()
            self._blocks[b] = block_permutation(self.seed, b, self.K)
        return b * self.K + self._blocks[b][p]

    def locate_raw(self, q: int) -> Tuple[int, int]:
        """Raw position ``q`` -> (shard, raw sample in it)."""
        r, o = divmod(q, self.per_round)
        order, starts, _ = self._round(r)
        k = bisect.bisect_right(starts, o) - 1  # the last of equal starts: empty shards hold no position
        return order[k], o - starts[k]

    def locate(self, i: int) -> Tuple[int, int]:
        return self.locate_raw(self.raw_position(i))

    def errors_between(self, lo: int, hi: int) -> List[Tuple[int, str]]:
        """``(shard, reason)`` of the read errors at raw positions ``lo <= q < hi`` (a walk of the stream
        meets an error when it asks for the raw sample after the ones the shard yielded before it)."""
        out = []
        if not self.errors or hi <= lo or self.per_round == 0:
            return out
        # an error of round r may sit at the first position of round r + 1 (a broken shard ends the round)
        for r in range(max(0, lo // self.per_round - 1), (hi - 1) // self.per_round + 1):
            _, starts, where = self._round(r)
            found = [(r * self.per_round + starts[k] + before, s, reason)
                     for s, k in where.items() for reason, before in self.errors[s]]
            out += [(s, reason) for q, s, reason in sorted(found) if lo <= q < hi]
        return out
