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

The cost. Every worker walks the whole raw stream (tar bytes are read, only its own samples are
decoded, rendered and tokenized), so each shard byte is read ``world_size * num_workers`` times instead
of once. Decoding, the dominant cost for image data, is not repeated. A worker keeps only its own raw
samples of the current block in memory.

The position. A single global counter (the next global sample) plus the cursor of some block at or
before it (``{"b": block, "s": index in the shard sequence, "j": raw samples into that shard}``) is the
whole resumable state: resuming re-opens shard ``s``, skips ``j`` raw samples undecoded, and walks
forward to the position (at most one step plus one block of undecoded samples). Any world size, worker
count, micro-batch size or accumulation can continue from it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, List, NamedTuple


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
