"""Eval, in one DataLoader worker: its share of ONE exact pass (every sample once over all ranks and
workers; ranks may get different numbers of batches).

With ``len(shards) >= G`` (G = world size x workers) worker ``g`` reads ``shards[g::G]`` in order; with
fewer shards every worker keeps raw sample ``j`` of shard ``s`` iff ``(s + j) % G == g`` and reads only
those (by index). Its position is ``{s, j}``: ``s`` counts its own shards, ``j`` raw samples into the
current one (the same world size and worker count to resume). A shard's read errors are counted once,
by the worker that starts it (with fewer shards than G: worker ``s % G``).
"""

from __future__ import annotations

from collections import Counter

from .collate import GreedyPacker
from .skips import SkipCounter


def eval_samples(stream, reader, g: int, G: int, pos: dict, skips: SkipCounter):
    """``(raw, position_after)`` of worker ``g``'s samples, in shard order, from ``pos`` on."""
    n = len(stream.indexes)
    split = n < G
    mine = list(range(n)) if split else list(range(g, n, G))
    for k in range(int(pos["s"]), len(mine)):
        ix = stream.indexes[mine[k]]
        first = int(pos["j"]) if k == int(pos["s"]) else 0
        if first == 0 and (not split or k % G == g):
            for reason, _ in ix.errors:
                skips.add(reason, ix.path)
        for j in range(first, ix.samples):
            if not split or (k + j) % G == g:
                yield reader.read(mine[k], j), {"s": k, "j": j + 1}


def iter_eval(stream, w: int, W: int):
    g, G = stream.rank * W + w, stream.world_size * W
    pos = stream.resume.get(w) or {"s": 0, "j": 0}
    skips, stats = SkipCounter(), Counter()

    def meta(state):
        return {"worker": w, "state": state, "skips": skips.state_dict(), "stats": dict(stats)}

    if pos.get("done"):
        yield {"_end": True, "_meta": meta(pos)}
        return
    size = stream.settings.batch_size
    packer = GreedyPacker(size, stream.settings.max_length) if stream.settings.pack else None
    batch: list = []
    reader = stream.reader(skips)
    try:
        for raw, after in eval_samples(stream, reader, g, G, pos, skips):
            item = stream.prepare.counted(raw, skips, stats)
            if item is None:
                continue
            item = item._replace(after=meta(after))
            rows = packer.add(item) if packer is not None else None
            if packer is None:
                batch.append(item)
            if rows or len(batch) == size:
                stats["batches"] += 1
                yield {**stream.batch(rows or batch, bool(rows)), "_meta": rows[-1][-1].after if rows else meta(after)}
                batch = []
    finally:
        reader.close()
    rows = packer.flush() if packer is not None else None
    if rows or batch:
        stats["batches"] += 1
        yield {**stream.batch(rows or batch, bool(rows)), "_meta": meta({"done": True})}
    yield {"_end": True, "_meta": meta({"done": True})}
