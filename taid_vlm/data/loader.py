"""The Loader: what the trainer iterates. It runs the DataLoader workers (stream.py), hands their
batches out in order (train: micro-batch ``n`` from worker ``n % num_workers``; eval: round robin over
the workers still running), sums their counters, and keeps the position: ``state_dict()`` /
``load_state_dict()``.

Train state: one global position (the start of the current optimizer step) + how many of this rank's
micro-batches of that step were handed out. Any world size, worker count or layout continues from a step
boundary. Version 2 states (which also held a walker's cursor, no longer needed) load as well.
Eval state: per worker ``{s, j}`` (same rank, world size, worker count, shards and batch size).
"""

from __future__ import annotations

import atexit
import copy
import logging
import multiprocessing
import weakref
from collections import Counter, deque
from typing import Any, Dict, Iterator, Optional

from torch.utils.data import DataLoader

from .skips import NoUsableSampleError, SkipCounter
from .stream import SampleStream

log = logging.getLogger(__name__)

STATE_VERSION = 1  # eval (per-worker positions)
TRAIN_STATE_VERSION = 3  # train (one global position)
TRAIN_STATE_VERSIONS = (2, 3)  # 2: the same plus a walker cursor, ignored


def _identity(x):
    return x


_LIVE_WORKERS: "weakref.WeakSet" = weakref.WeakSet()  # DataLoader iterators with worker processes


def _stop_live_workers() -> None:
    """At interpreter exit, tell the workers of every DataLoader iterator still alive (one kept by a reference
    cycle is collected late or never) to stop. Left to multiprocessing's own exit hook they would be SIGTERMed,
    which they ignore (ignore_stop_signals), and waited for forever: the finished process hung (seen in CI:
    pytest waiting in multiprocessing's _exit_function on workers idle in their index queue). A daemon
    child still alive after that (its iterator was not in the set) is killed: only data workers are
    daemons here, and the process is ending."""
    for it in list(_LIVE_WORKERS):
        try:
            it._shutdown_workers()
        except Exception:  # a half-built or half-closed iterator: its workers are killed below
            pass
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


# Registered at import, after multiprocessing's own exit hook (torch.utils.data imports multiprocessing
# first): atexit runs hooks last-in first-out, so this one runs before multiprocessing waits on its children.
atexit.register(_stop_live_workers)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM (and SIGINT, which PyTorch's workers already survive). `timeout`,
    SLURM, Kubernetes and a terminal signal the whole process GROUP: a worker killed by SIGTERM made the
    main process raise "DataLoader worker ... is killed by signal" in the middle of a step, before
    train/signals.py could finish the step and checkpoint (tests/test_run_safety.py). The main process
    stops gracefully and then shuts its workers down; a worker whose main process dies anyway exits
    through the DataLoader's own parent watchdog."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)



class Loader:
    """What the trainer iterates: batches (see the package docstring), with ``state_dict()`` /
    ``load_state_dict()`` for an exact resume and ``skips`` / ``stats`` counters.

    ``iter(loader)`` continues from the current position. In eval mode, after a pass ran to the end,
    the counters still describe that pass; the next ``iter`` starts a fresh full pass (and counters).
    """

    def __init__(self, stream: SampleStream, *, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: Optional[int] = None, multiprocessing_context: Optional[str] = None):
        self.stream = stream
        self.num_workers = int(num_workers)
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self._reset()

    def _reset(self) -> None:
        self._states: Dict[int, dict] = {}
        self._next = 0
        self._base_skips = SkipCounter()
        self._base_stats: Counter = Counter()
        self._worker_skips: Dict[int, dict] = {}
        self._worker_stats: Dict[int, dict] = {}
        self._finished = False
        self._origin, self._handed = 0, 0  # train: global position of micro-batch 0, micro-batches handed out

    # -- counters --------------------------------------------------------------------------------
    @property
    def skips(self) -> SkipCounter:
        """All skipped samples so far (this rank), by reason, with example keys."""
        total = SkipCounter.from_state(self._base_skips.state_dict())
        for sd in self._worker_skips.values():
            total.merge(SkipCounter.from_state(sd))
        return total

    @property
    def raw_samples(self) -> int:
        """Raw samples in one round of its shards, from the shard index (unusable ones included)."""
        return sum(ix.samples for ix in self.stream.indexes)

    @property
    def stats(self) -> Dict[str, int]:
        """samples, batches, supervised_tokens, truncated, unaligned_tokens_dropped (this rank)."""
        total = Counter(self._base_stats)
        for sd in self._worker_stats.values():
            total.update(sd)
        return dict(total)

    def _fold_counters(self) -> None:
        self._base_skips = self.skips
        self._base_stats = Counter(self.stats)
        self._worker_skips, self._worker_stats = {}, {}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = self.stream
        if st.mode == "train":
            return {"version": TRAIN_STATE_VERSION, "mode": "train", "order": self._order_key(), "rank": st.rank,
                    "layout": st.layout.as_dict(), **st.layout.position_after(self._origin, self._handed),
                    "skips": self.skips.state_dict(), "stats": self.stats}
        return {"version": STATE_VERSION, "mode": st.mode, "seed": st.seed, "rank": st.rank,
                "world_size": st.world_size, "num_workers": self.num_workers, "shards": len(st.shards),
                "batch_size": st.batch_size, "workers": copy.deepcopy(self._states), "next_worker": self._next,
                "skips": self.skips.state_dict(), "stats": self.stats}

    def _order_key(self) -> dict:
        """What defines the global sample order: resuming needs all of it unchanged."""
        st = self.stream
        key = {"seed": st.seed, "shards": len(st.shards), "shuffle_buffer": st.shuffle_buffer,
               "samples": st.order.per_round}
        if st.sources:
            key["sources"] = [[n, w] for _, n, w in st.sources]
        return key

    def load_state_dict(self, sd: dict) -> None:
        """Train: a state written by ANY rank, world size or worker count continues the same global
        order (a state taken mid-step also needs the same micro-batch size, accumulation and world size).
        The skip and sample counters come back only on the rank that wrote them. Eval: the same rank,
        world size, worker count, shards and batch size."""
        st = self.stream
        if st.mode == "train":
            if sd.get("version") not in TRAIN_STATE_VERSIONS or sd.get("mode") != "train":
                raise ValueError(f"data loader state is not a train state of version {TRAIN_STATE_VERSION} "
                                 f"(got mode {sd.get('mode')!r}, version {sd.get('version')!r})")
            want = self._order_key()
            diff = {k: (sd["order"].get(k), v) for k, v in want.items() if sd["order"].get(k, v) != v}
            if diff:
                raise ValueError(f"data loader state does not match this loader (saved, now): {diff}; the global "
                                 "sample order needs the same seed, shards (and their samples) and shuffle_buffer "
                                 "to continue")
            if int(sd["micro"]) and sd["layout"] != st.layout.as_dict():
                raise ValueError(f"data loader state was taken {sd['micro']} micro-batches into a step with layout "
                                 f"{sd['layout']}; this loader has {st.layout.as_dict()}: resume from a step boundary")
            self._reset()
            self._origin, self._handed = int(sd["position"]), int(sd["micro"])
            if sd.get("rank") == st.rank:
                self._base_skips = SkipCounter.from_state(sd.get("skips"))
                self._base_stats = Counter(sd.get("stats", {}))
            return
        want = {"mode": st.mode, "seed": st.seed, "rank": st.rank, "world_size": st.world_size,
                "num_workers": self.num_workers, "shards": len(st.shards), "batch_size": st.batch_size}
        diff = {k: (sd.get(k), v) for k, v in want.items() if sd.get(k) != v}
        if sd.get("version") != STATE_VERSION or diff:
            raise ValueError(f"data loader state does not match this loader (saved, now): {diff or sd.get('version')}; "
                             "an exact resume needs the same seed, world size, worker count, shards and batch size")
        self._reset()
        self._states = {int(k): dict(v) for k, v in sd["workers"].items()}
        self._next = int(sd["next_worker"])
        self._base_skips = SkipCounter.from_state(sd.get("skips"))
        self._base_stats = Counter(sd.get("stats", {}))

    def check_usable(self) -> None:
        """Raise NoUsableSampleError (with the skip counts by reason) unless the shards hold at least one
        usable sample. Reads in shard order and stops at the first usable one: call it at setup, so an
        all-bad set (e.g. data.val) fails before training rather than as an empty metric."""
        self.stream.first_usable()

    # -- iteration -------------------------------------------------------------------------------
    def _dataloader(self, stream: SampleStream):
        kw: Dict[str, Any] = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": self.multiprocessing_context,
                  "worker_init_fn": ignore_stop_signals}
        it = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                             pin_memory=self.pin_memory, **kw))
        if self.num_workers > 0:
            _LIVE_WORKERS.add(it)
        return it

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        if self.stream.mode == "train":
            return self._iter_train()
        return self._iter_eval()

    def _iter_train(self) -> Iterator[Dict[str, Any]]:
        """Micro-batch ``n`` comes from worker ``n % num_workers``; the position is the number handed out."""
        self._fold_counters()
        layout = self.stream.layout
        here = layout.position_after(self._origin, self._handed)
        self._origin, self._handed = here["position"], here["micro"]  # re-based on the current step
        stream = copy.copy(self.stream)
        stream.resume = dict(here)
        n_slots = max(1, self.num_workers)
        pending: Dict[int, deque] = {w: deque() for w in range(n_slots)}
        it = self._dataloader(stream)
        while True:
            w = self._handed % n_slots
            while not pending[w]:
                try:
                    item = next(it)
                except StopIteration:
                    raise RuntimeError(f"data worker {w} of the endless train stream stopped") from None
                if "_error" in item:
                    raise NoUsableSampleError(item["_error"])
                pending[item["_meta"]["worker"]].append(item)
            item = pending[w].popleft()
            m = item.pop("_meta")
            if m["n"] != self._handed:
                raise RuntimeError(f"data worker {w} sent micro-batch {m['n']}, expected {self._handed}; this is a bug")
            self._worker_skips[w], self._worker_stats[w] = m["skips"], m["stats"]
            self._handed += 1
            yield item

    def _iter_eval(self) -> Iterator[Dict[str, Any]]:
        if self._finished:  # eval: a finished pass is followed by a fresh full one
            self._reset()
        self._fold_counters()
        n_slots = max(1, self.num_workers)
        stream = copy.copy(self.stream)
        stream.resume = copy.deepcopy(self._states)
        active = [w for w in range(n_slots) if not self._states.get(w, {}).get("done")]
        pending: Dict[int, deque] = {w: deque() for w in range(n_slots)}
        it = self._dataloader(stream)
        while active:
            w = self._next if self._next in active else min(active, key=lambda a: (a - self._next) % n_slots)
            while not pending[w]:
                try:
                    item = next(it)
                except StopIteration:
                    raise RuntimeError(f"data worker {w} stopped without its end marker") from None
                pending[item["_meta"]["worker"]].append(item)
            item = pending[w].popleft()
            m = item.pop("_meta")
            self._states[w] = m["state"]
            self._worker_skips[w], self._worker_stats[w] = m["skips"], m["stats"]
            if item.get("_end"):
                active.remove(w)
                self._next = w
                continue
            later = sorted(active, key=lambda a: (a - w - 1) % n_slots)
            self._next = later[0]
            yield item
        if self.skips.total:  # a clean pass says nothing
            log.info("eval pass done: %s", self.skips.summary())
        self._finished = True

    def __repr__(self) -> str:
        st = self.stream
        return (f"Loader(mode={st.mode}, shards={len(st.shards)}, batch_size={st.batch_size}, "
                f"workers={self.num_workers}, rank={st.rank}/{st.world_size})")
