"""Train, in one DataLoader worker: its micro-batches of the one global sample order (global_order.py).

Micro-batch ``n`` of rank ``r`` holds global samples ``Layout.slot(origin, r, n)``; this worker makes
those with ``n % num_workers == worker``. Each sample is located through the index (``RawOrder``) and
only its bytes are read. A sample found unusable leaves its slot empty; a micro-batch left with no
sample at all carries a filler (a usable sample with no supervised token and no key), so every rank
still runs its forward/backward. The filler is this worker's first usable sample, or else the first
usable one from the start of the step's block on (at most the rest of that round and the next: none
usable there means none anywhere: NoUsableSampleError, as when the shards hold no raw sample at all).
"""

from __future__ import annotations

from collections import Counter

from .collate import GreedyPacker
from .prepare import Prepared, as_filler
from .skips import NoUsableSampleError, SkipCounter, no_usable_message


def find_filler(stream, order, reader, step_start: int) -> Prepared:
    """The first usable sample from the start of the block holding ``step_start`` on, as a filler. Its
    counts are its own (the samples are other workers' to count)."""
    scan_skips, stats = SkipCounter(), Counter()
    first = step_start // order.K * order.K
    limit = (first // order.per_round + 2) * order.per_round  # the rest of this round and all of the next
    for q in range(first, limit):
        prepared = stream.prepare.counted(reader.read(*order.locate_raw(q)), scan_skips, stats)
        if prepared is not None:
            return as_filler(prepared)
    for s, reason in order.errors_between(first, limit):
        scan_skips.add(reason, stream.indexes[s].path)
    raise NoUsableSampleError(no_usable_message(stream.shards, scan_skips))


def _packed_or_not(stream, items: list) -> dict:
    if not stream.settings.pack:
        return stream.batch(items, False)
    packer = GreedyPacker(len(items) + 1, stream.settings.max_length)  # never full: rows come out of flush
    for item in items:
        packer.add(item)
    return stream.batch(packer.flush(), True)


def iter_train(stream, w: int, W: int):
    order = stream.order
    start = stream.resume or {"position": 0, "micro": 0}
    origin = int(start["position"])
    skips, stats = SkipCounter(), Counter()
    counts_reads = stream.rank == 0 and w == 0  # shard read errors: counted once, by rank 0's first worker
    reader = stream.reader(skips if counts_reads else SkipCounter())
    if order.per_round == 0:
        yield {"_error": no_usable_message(stream.shards, stream.index_errors()), "_meta": {"worker": w}}
        return
    passed = origin // order.K * order.K  # raw positions the stream has passed (read errors counted)
    filler = None
    try:
        for slot in stream.layout.worker_slots(origin, stream.rank, w, W, int(start["micro"])):
            if counts_reads:  # a walk of the stream reads whole blocks: it has met every error before this one's end
                reached = ((slot.stop - 1) // order.K + 1) * order.K
                for s, reason in order.errors_between(passed, reached):
                    skips.add(reason, stream.indexes[s].path)
                passed = max(passed, reached)
            items = []
            for i in range(slot.start, slot.stop):
                prepared = stream.prepare.counted(reader.read(*order.locate(i)), skips, stats)
                if prepared is not None:
                    items.append(prepared._replace(index=i))
            if items and filler is None:
                filler = as_filler(items[0])
            if not items:
                filler = filler or find_filler(stream, order, reader, slot.step_start)
                items = [filler]
            stats["batches"] += 1
            batch = _packed_or_not(stream, items)
            yield {**batch, "_meta": {"worker": w, "n": slot.n, "skips": skips.state_dict(), "stats": dict(stats)}}
    except NoUsableSampleError as e:
        yield {"_error": str(e), "_meta": {"worker": w}}
    finally:
        reader.close()
