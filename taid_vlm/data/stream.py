"""The worker side: a torch IterableDataset that each DataLoader worker iterates, yielding collated
batches with a ``"_meta"`` entry (which worker, its position, its counters) for the Loader (loader.py).

Train: this worker's micro-batches of the one global order (train_stream.py). Eval: this worker's
share of one exact pass (eval_order.py). Both read samples by index (sample_reader.py) and prepare
them (prepare.py); nothing here reads a byte that another worker reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from torch.utils.data import IterableDataset, get_worker_info

from .eval_order import iter_eval
from .global_order import Layout, RawOrder
from .mixture import MixedOrder
from .prepare import Preparer
from .sample_reader import SampleReader
from .node_cache import NodeCache
from .shard_index import ShardIndex
from .shard_io import use_node_cache
from .skips import NoUsableSampleError, SkipCounter, no_usable_message
from .train_stream import iter_train


@dataclass(frozen=True)
class StreamSettings:
    """How a stream slices and batches (build_loader's keyword arguments, checked there)."""

    mode: str = "train"
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 2048
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    pack: bool = False
    shuffle_buffer: int = 1000
    pad_to_multiple_of: Optional[int] = None


class SampleStream(IterableDataset):
    """Worker-side stream of collated batches. Each item is a batch dict plus ``"_meta"``; the last
    item of a finite (eval) stream is ``{"_end": True, "_meta": ...}``."""

    def __init__(self, shards: List[str], indexes: List[ShardIndex], preparer: Preparer, settings: StreamSettings,
                 companion_paths: Optional[Dict[str, str]] = None, sources: Optional[List[Tuple[int, int, float]]] = None,
                 shard_cache: Optional[NodeCache] = None, companion_indexes: Optional[Dict[str, ShardIndex]] = None):
        """``sources``: a weighted mixture (mixture.py) as (first shard, number of shards, weight) each;
        ``shard_cache``: where this node keeps remote shards (set again in each worker process);
        ``companion_indexes``: the plain-tar companions' index (read by byte range)."""
        super().__init__()
        self.shard_cache = shard_cache
        self.sources = sources
        self.shards, self.indexes, self.prepare, self.settings = shards, indexes, preparer, settings
        self.companion_paths, self.companion_indexes = companion_paths, companion_indexes
        self.mode, self.seed, self.rank = settings.mode, settings.seed, settings.rank
        self.world_size, self.batch_size = settings.world_size, settings.batch_size
        self.shuffle_buffer = settings.shuffle_buffer if settings.mode == "train" else 1
        self.layout = Layout(settings.batch_size, settings.grad_accum, settings.world_size)
        self.resume: Dict[Any, Any] = {}  # train: the global position; eval: per-worker positions

    @property
    def order(self):
        """The global order: a RawOrder over all shards, or a MixedOrder over the sources' own orders."""
        if not self.sources:
            return RawOrder(self.seed, self.shuffle_buffer, [ix.samples for ix in self.indexes],
                            [ix.errors for ix in self.indexes])
        own = [(RawOrder(f"{self.seed}:{k}", self.shuffle_buffer, [ix.samples for ix in self.indexes[a:a + n]],
                         [ix.errors for ix in self.indexes[a:a + n]]), a, w) for k, (a, n, w) in enumerate(self.sources)]
        return MixedOrder(self.seed, own)

    def reader(self, companion_skips: Optional[SkipCounter] = None) -> SampleReader:
        return SampleReader(self.indexes, self.companion_paths, companion_skips, self.companion_indexes)

    def index_errors(self) -> SkipCounter:
        """Every shard's read errors once (one round): the reasons of a set with no usable sample."""
        skips = SkipCounter()
        for ix in self.indexes:
            for reason, _ in ix.errors:
                skips.add(reason, ix.path)
        return skips

    def batch(self, items: list, packed: bool) -> Dict[str, Any]:
        return self.prepare.batch(items, packed, self.settings.pad_to_multiple_of, self.mode == "train")

    def first_usable(self) -> bool:
        """True at the first usable sample in shard order (a setup check); the reasons otherwise."""
        skips, stats = self.index_errors(), Counter()
        reader = self.reader(SkipCounter())
        try:
            for s, ix in enumerate(self.indexes):
                for j in range(ix.samples):
                    if self.prepare.counted(reader.read(s, j), skips, stats) is not None:
                        return True
        finally:
            reader.close()
        raise NoUsableSampleError(f"{self.mode} data: " + no_usable_message(self.shards, skips))

    def __iter__(self):
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.shard_cache is not None:
            use_node_cache(self.shard_cache)
        yield from (iter_train if self.mode == "train" else iter_eval)(self, w, W)
