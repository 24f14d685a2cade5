"""Streaming WebDataset shards into teacher/student batches, resumable, across nodes and workers.

Layout of the stream (all inside each DataLoader worker, so decode/transform/tokenize run in parallel):

  shard sequence  ->  raw samples (webdataset tar iterators, counted error handler)
  ->  this worker's samples  ->  decode + validate (samples.py)  ->  render per model (render.py)
  ->  align (align.py)  ->  batch + collate, or pack (collate.py)  ->  main process (order, state)

Train (endless): ONE global sample order for every world size and worker count, which each rank and
worker slices (global_order.py: shard rounds, block shuffle of ``shuffle_buffer`` raw samples, and
optimizer step k = global samples [k*Bg, (k+1)*Bg) with Bg = micro-batch x grad_accum x world size).
Every worker reads the whole raw stream and decodes only its own samples. A sample found unusable
leaves its slot empty; a micro-batch left with no sample at all carries a "filler" (a usable sample
with no supervised token, no key), so every rank still runs its forward/backward. The position is one
global sample counter (+ the cursor of a block before it): the same batches follow on any world size
or worker count. With ``pack=True`` a micro-batch's samples (documents) are packed into rows.

No usable sample: the read errors of 2 x len(shards) shards in a row, or a filler search that decodes a
full shard round without a usable sample, stop the stream with NoUsableSampleError (the skip counts by
reason) on every rank and worker alike (they all read the same stream). Broken shards among good ones
are counted (``tar_error``/``truncated_tar``, by rank 0's first worker) and skipped. ``Loader.check_usable``
is the setup check (e.g. for the val set): it stops at the first usable sample.

Eval (exact, single pass): with ``len(shards) >= G`` (G = world size x workers) worker g reads
``shards[g::G]`` in order; with fewer shards every worker reads all of them and keeps raw sample ``j``
of shard ``s`` iff ``(s + j) % G == g``. Either way every sample is seen exactly once over all ranks
and workers. Its position is per worker ``{s, j}`` (same world size and worker count to resume).

Companion shards (a cached teacher, taid_vlm.teacher_cache): with ``companion=``, every data shard is
read together with its companion tar, which holds one record per raw data sample under the same
``__key__`` in the same order. The two are zipped raw sample by raw sample (the key checked) BEFORE
the block shuffle, so shuffling, splitting and resume move a sample and its cached teacher together.
A key mismatch is an error (the companion was written for other data); a companion that ends early
(truncated) makes the rest of the shard's samples counted skips (``teacher_cache_missing``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import tarfile
from collections import Counter, deque
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ..errors import UserError
from ..spec import InputSpec
from .align import align_labels
from .collate import GreedyPacker, collate, collate_packed
from .formats import DEFAULT_CAPTION_INSTRUCTION
from .global_order import Layout, block_permutation, shard_round_order
from .render import IGNORE_INDEX, Renderer, check_spec, pad_token_id
from .samples import decode_sample
from .shards import ShardSpec, expand_shards
from .node_cache import FetchError, NodeCache
from .skips import FETCH_ERROR, TAR_ERROR, TRUNCATED_TAR, UNALIGNED, SampleError, SkipCounter

log = logging.getLogger(__name__)

COMPANION_FIELD = "__companion__"
COMPANION_SKIP = "__companion_skip__"

STATE_VERSION = 1  # eval (per-worker positions)
TRAIN_STATE_VERSION = 2  # train (one global position)


def _identity(x):
    return x


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


class NoUsableSampleError(UserError, RuntimeError):
    """A full pass over the shards found no sample that can be trained on (the message lists why)."""


def no_usable_message(shards: List[str], skips: SkipCounter) -> str:
    where = shards[0] if len(shards) == 1 else f"{shards[0]} ... {shards[-1]}"
    return (f"no usable sample in a full pass over {len(shards)} shard(s) ({where}): {skips.summary()}; "
            "check the data (data_tools.check_shards) and data.max_length")


def _as_filler(prepared):
    """``(key, parts, record)`` -> the same sample with no supervised token and no key: it only keeps a
    micro-batch's forward/backward running (zero loss, zero gradient)."""
    _, parts, record = prepared
    masked = {}
    parts = [masked.setdefault(id(p), dataclasses.replace(p, labels=[IGNORE_INDEX] * len(p))) for p in parts]
    return None, parts, (record.select(slice(0, 0)) if record is not None else None)


def read_shard(path: str, skips: SkipCounter, start: int = 0, opener=gopen) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard (webdataset's tar iterator + group_by_keys); the first ``start`` are
    skipped undecoded. Read errors are counted (truncated tar: samples before the cut survive).
    ``opener``: path -> binary stream (``NodeCache.open`` fetches a remote shard once per node)."""

    seen = set()  # one truncated tar raises twice (member read, then the header walk): count it once

    def count(exn: BaseException) -> None:
        msg = str(exn).lower()
        reason = TRUNCATED_TAR if ("unexpected end" in msg or isinstance(exn, EOFError)) else TAR_ERROR
        reason = FETCH_ERROR if isinstance(exn, FetchError) else reason
        if reason not in seen:
            skips.add(reason, path)
            seen.add(reason)

    def handler(exn: Exception) -> bool:
        count(exn)
        return True

    def files():
        try:
            stream = opener(path)
        except Exception as e:  # unreadable / vanished shard: counted, the stream goes on
            count(e)
            return
        try:
            # tarfile raises from its own iterator (outside webdataset's per-member try) on a cut tar;
            # catching it here ends the shard cleanly so group_by_keys still flushes the last sample.
            for f in tar_file_iterator(stream, handler=handler):
                f["__url__"] = path
                yield f
        except (tarfile.TarError, EOFError, OSError) as e:
            count(e)
        finally:
            stream.close()

    for j, sample in enumerate(group_by_keys(files(), handler=handler)):
        if j >= start:
            yield sample


def read_shard_with_companion(path: str, companion_path: str, skips: SkipCounter, start: int = 0,
                              field: str = "topk", skip_field: str = "skip", opener=gopen) -> Iterator[Dict[str, Any]]:
    """``read_shard`` of the data shard, each raw sample carrying its companion record under
    ``COMPANION_FIELD`` (bytes) or the reason the companion writer skipped it under ``COMPANION_SKIP``.
    Both tars are walked from the start (raw samples are not decoded), so the pairing is by position
    and key whatever ``start`` is; the first ``start`` pairs are dropped."""
    comp = read_shard(companion_path, skips, opener=opener)
    c = next(comp, None)
    for j, raw in enumerate(read_shard(path, skips, opener=opener)):
        key = raw.get("__key__")
        if c is None:  # the companion ended early (truncated): the rest of this shard cannot be used
            if j >= start:
                skips.add("teacher_cache_missing", key)
            continue
        if c.get("__key__") != key:
            raise RuntimeError(
                f"companion shard {companion_path} is misaligned with {path}: raw sample {j} has key "
                f"{c.get('__key__')!r} there and {key!r} here; the companion was not written for this shard "
                "(rebuild the teacher cache)")
        paired = c
        c = next(comp, None)
        if j < start:
            continue
        if field in paired:
            raw[COMPANION_FIELD] = paired[field]
        elif skip_field in paired:
            raw[COMPANION_SKIP] = bytes(paired[skip_field]).decode("utf-8", "replace") or "teacher_cache_skip"
        else:  # a member lost to a cut: the key survived, the record did not
            raw[COMPANION_SKIP] = "teacher_cache_missing"
        yield raw


class SampleStream(IterableDataset):
    """Worker-side stream of collated batches. Each item is a batch dict plus ``"_meta"``; the last
    item of a finite (eval) stream is ``{"_end": True, "_meta": ...}``."""

    def __init__(self, shards: List[str], student: InputSpec, teacher: Optional[InputSpec], *, mode: str,
                 batch_size: int, max_length: int, seed: int, rank: int, world_size: int,
                 caption_instruction: str, text_only: bool, pack: bool, shuffle_buffer: int,
                 pad_to_multiple_of: Optional[int] = None, companion: Any = None,
                 companion_paths: Optional[Dict[str, str]] = None, grad_accum: int = 1,
                 shard_cache: Optional[NodeCache] = None, prompt_tokens: int = 0):
        super().__init__()
        self.layout = Layout(batch_size, grad_accum, world_size)
        self.shards = shards
        self.mode = mode
        self.batch_size, self.max_length = batch_size, max_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.caption_instruction, self.text_only, self.pack = caption_instruction, text_only, pack
        self.shuffle_buffer = shuffle_buffer if mode == "train" else 1
        self.pad_to_multiple_of = pad_to_multiple_of
        self.student_r = Renderer(student, max_length, prompt_tokens)
        self.teacher_r = None if teacher is None else (
            self.student_r if teacher is student else Renderer(teacher, max_length, prompt_tokens))
        self.pad_ids = [pad_token_id(student.tokenizer)] + ([] if teacher is None else [pad_token_id(teacher.tokenizer)])
        self.resume: Dict[Any, Any] = {}  # train: the global position; eval: per-worker positions
        self.companion = companion  # a teacher cache (taid_vlm.teacher_cache.TeacherCache) or None
        self.companion_paths = companion_paths or {}
        self.open_shard = gopen if shard_cache is None else shard_cache.open  # remote: once per node

    # -- raw samples in order ----------------------------------------------------------------------
    def _shard_at(self, g: int, G: int, s: int) -> Optional[str]:
        """The ``s``-th shard of the sequence: train, the global rounds (global_order.py); eval, this
        worker's share."""
        n = len(self.shards)
        if self.mode == "train":
            return self.shards[shard_round_order(self.seed, s // n, n)[s % n]]
        mine = self.shards[g::G] if n >= G else self.shards
        return mine[s] if s < len(mine) else None

    def _raw(self, g: int, G: int, s: int, j: int, skips: SkipCounter):
        """Yield ``(s, j_after, raw)`` from position (s, j) on. An endless (train) sequence in which
        2 * len(shards) shards in a row give no raw sample contains a full round of unreadable shards:
        that is the end (NoUsableSampleError), while one readable shard among broken ones is enough."""
        split_samples = self.mode == "eval" and len(self.shards) < G
        empty_run = 0
        for s in itertools.count(s):
            path = self._shard_at(g, G, s)
            if path is None:
                return
            got = False
            for jj, raw in enumerate(self._read(path, skips, j), start=j):
                got = True
                if split_samples and (s + jj) % G != g:
                    continue
                yield s, jj + 1, raw
            j = 0
            empty_run = 0 if got else empty_run + 1
            if empty_run >= 2 * len(self.shards):
                raise NoUsableSampleError(no_usable_message(self.shards, skips))

    def _read(self, path: str, skips: SkipCounter, start: int):
        if self.companion is None:
            return read_shard(path, skips, start=start, opener=self.open_shard)
        return read_shard_with_companion(path, self.companion_paths[path], skips, start=start, opener=self.open_shard)

    def _eval_samples(self, g: int, G: int, pos: dict, skips: SkipCounter):
        """Eval, in shard order: yield ``(raw, position_after)``; the position is ``{s, j}``."""
        for s, j, raw in self._raw(g, G, pos["s"], pos["j"], skips):
            yield raw, {"s": s, "j": j}

    # -- samples -> rendered, aligned ------------------------------------------------------------
    def prepare(self, raw: Dict[str, Any], stats: Counter):
        if COMPANION_SKIP in raw:
            raise SampleError(raw[COMPANION_SKIP], "skipped by the teacher cache writer")
        sample = decode_sample(raw, self.caption_instruction, self.text_only)
        s = self.student_r(sample)
        if self.companion is not None:
            record, labels, dropped = self.companion.align(raw[COMPANION_FIELD], s.labels, sample.key)
            if dropped:
                stats["unaligned_tokens_dropped"] += dropped
                s.labels = labels
            stats["samples"] += 1
            stats["truncated"] += int(s.truncated)
            stats["supervised_tokens"] += int(record.targets.shape[0])
            return sample.key, [s], record
        elif self.teacher_r is None:
            parts = [s]
        elif self.teacher_r is self.student_r:
            parts = [s, s]
        else:
            t = self.teacher_r(sample)
            sl, tl, dropped = align_labels(s.labels, t.labels)
            if dropped:
                stats["unaligned_tokens_dropped"] += dropped
                s.labels, t.labels = sl, tl
                if not any(x != IGNORE_INDEX for x in sl[1:]):
                    raise SampleError(UNALIGNED, "teacher and student share no supervised token")
            parts = [s, t]
        stats["samples"] += 1
        stats["truncated"] += int(any(p.truncated for p in parts))
        stats["supervised_tokens"] += sum(1 for x in s.labels[1:] if x != IGNORE_INDEX)
        return sample.key, parts, None

    def _batch(self, items: list, packed: bool) -> Dict[str, Any]:
        names = ["student", "teacher"][: len(self.pad_ids)]
        out: Dict[str, Any] = {}
        for m, name in enumerate(names):
            if packed:
                rows = [[it[1][m] for it in row] for row in items]
                out[name] = collate_packed(rows, self.pad_ids[m], self.pad_to_multiple_of)
            else:
                out[name] = collate([it[1][m] for it in items], self.pad_ids[m], self.pad_to_multiple_of)
        flat = [it for row in items for it in row] if packed else items
        out["keys"] = [it[0] for it in flat if it[0] is not None]  # a filler (key None) is no sample
        if self.mode == "train":  # each row's global sample index (-1: a filler)
            out["indices"] = [it[2] for it in flat]
        if self.companion is not None:  # records in loss_targets order: sample-major, then token order
            records = [it[3] for it in flat]
            topk = self.companion.collate(records)
            if not torch.equal(topk.pop("targets").long(), out["student"]["loss_targets"]):
                raise RuntimeError(f"teacher cache rows do not line up with the student's supervised tokens "
                                   f"(samples {out['keys'][:4]}); this is a bug")
            out["teacher_topk"] = topk
        return out

    def __iter__(self):
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.mode == "train":
            yield from self._iter_train(w, W)
        else:
            yield from self._iter_eval(w, W)

    # -- train: this worker's slots of the global order (global_order.py) -------------------------
    def _prepare_counted(self, raw, skips: SkipCounter, stats: Counter):
        try:
            return self.prepare(raw, stats)
        except SampleError as e:
            skips.add(e.reason, raw.get("__key__"))
            return None

    def _render_slot(self, slot, pending: Dict[int, Any], skips: SkipCounter, stats: Counter) -> list:
        """The usable samples of one micro-batch slot, in global order, taken out of ``pending``
        (O(micro-batch) lookups, not a scan of the block)."""
        prepared = []
        for i in range(slot.start, slot.stop):
            if i in pending:
                item = self._prepare_counted(pending.pop(i), skips, stats)
                if item is not None:
                    prepared.append((i, item))
        return prepared

    def _train_batch(self, items: list) -> Dict[str, Any]:
        if not self.pack:
            return self._batch(items, False)
        packer = GreedyPacker(len(items) + 1, self.max_length)  # never full: rows come out of flush
        for item in items:
            packer.add(item)
        return self._batch(packer.flush(), True)

    def _find_filler(self, cursor: dict):
        """A usable sample to stand in, with no supervised token, for a micro-batch whose samples were
        all unusable (every rank must still run forward/backward). Scans forward from ``cursor`` over
        at least one full shard round, decoding every sample; none usable there means none anywhere.
        Its counts are its own (the samples are other workers' to count)."""
        scan_skips, stats = SkipCounter(), Counter()
        n = len(self.shards)
        limit = (cursor["s"] // n + 2) * n  # the rest of this round and all of the next
        try:
            for s, _, raw in self._raw(0, 1, cursor["s"], cursor["j"], scan_skips):
                if s >= limit:
                    break
                prepared = self._prepare_counted(raw, scan_skips, stats)
                if prepared is not None:
                    return _as_filler(prepared)
        except NoUsableSampleError:
            pass
        raise NoUsableSampleError(no_usable_message(self.shards, scan_skips))

    def _iter_train(self, w: int, W: int):
        layout, K = self.layout, max(1, self.shuffle_buffer)
        start = self.resume or {"position": 0, "micro": 0, "cursor": {"b": 0, "s": 0, "j": 0}}
        origin, cursor = int(start["position"]), dict(start["cursor"])
        skips, stats = SkipCounter(), Counter()
        # Every worker reads every shard: one of them (rank 0, worker 0) counts the read errors.
        read_skips = skips if (self.rank == 0 and w == 0) else SkipCounter()

        def meta(slot, step_cursor):
            return {"worker": w, "n": slot.n, "cursor": step_cursor, "skips": skips.state_dict(), "stats": dict(stats)}

        slots = layout.worker_slots(origin, self.rank, w, W, int(start["micro"]))
        upcoming: deque = deque([next(slots)])
        pending: Dict[int, Any] = {}  # global index -> raw sample (bytes) of this worker, not rendered yet
        cursors: Dict[int, dict] = {}  # block -> cursor, for blocks a later slot's step may start in
        filler = None
        b, s, j = int(cursor["b"]), int(cursor["s"]), int(cursor["j"])
        raw_stream = self._raw(0, 1, s, j, read_skips)
        try:
            while True:
                cursors[b] = {"b": b, "s": s, "j": j}
                base, end = b * K, (b + 1) * K
                while upcoming[-1].start < end:
                    upcoming.append(next(slots))
                perm = block_permutation(self.seed, b, K)
                need: Dict[int, int] = {}  # raw offset in the block -> global index
                for slot in upcoming:
                    for i in range(max(slot.start, base), min(slot.stop, end)):
                        need[perm[i - base]] = i
                for offset, (s, j, raw) in enumerate(itertools.islice(raw_stream, K)):
                    if offset in need:
                        pending[need[offset]] = raw
                while upcoming and upcoming[0].stop <= end:  # complete micro-batches, in order
                    slot = upcoming.popleft()
                    # Rendered only now, one micro-batch at a time: a block holds raw bytes, never the
                    # pixel tensors of shuffle_buffer samples.
                    prepared = self._render_slot(slot, pending, skips, stats)
                    if prepared and filler is None:
                        filler = _as_filler(prepared[0][1])
                    # train items carry their global sample index (generation is seeded by it); a filler -1
                    items = [(key, parts, i, record) for i, (key, parts, record) in prepared]
                    if not items:
                        if filler is None:
                            filler = self._find_filler(cursors[slot.step_start // K])
                        items = [(None, filler[1], -1, filler[2])]
                    stats["batches"] += 1
                    step_cursor = cursors[slot.step_start // K]
                    batch = self._train_batch(items)
                    for old in [x for x in cursors if x < slot.step_start // K]:
                        del cursors[old]
                    yield {**batch, "_meta": meta(slot, step_cursor)}
                if not upcoming:
                    upcoming.append(next(slots))
                b += 1
        except NoUsableSampleError as e:
            yield {"_error": str(e), "_meta": {"worker": w}}

    # -- eval: one exact pass, split over ranks and workers -----------------------------------------
    def _iter_eval(self, w: int, W: int):
        g, G = self.rank * W + w, self.world_size * W
        pos = self.resume.get(w) or {"s": 0, "j": 0}
        skips, stats = SkipCounter(), Counter()

        def meta(state):
            return {"worker": w, "state": state, "skips": skips.state_dict(), "stats": dict(stats)}

        if pos.get("done"):
            yield {"_end": True, "_meta": meta(pos)}
            return
        packer = GreedyPacker(self.batch_size, self.max_length) if self.pack else None
        batch: list = []
        for raw, after in self._eval_samples(g, G, pos, skips):
            try:
                key, parts, record = self.prepare(raw, stats)
            except SampleError as e:
                skips.add(e.reason, raw.get("__key__"))
                continue
            item = (key, parts, meta(after), record)  # record: the cached teacher's rows, or None
            if packer is not None:
                rows = packer.add(item)
                if rows is not None:
                    stats["batches"] += 1
                    yield {**self._batch(rows, True), "_meta": rows[-1][-1][2]}
            else:
                batch.append(item)
                if len(batch) == self.batch_size:
                    stats["batches"] += 1
                    yield {**self._batch(batch, False), "_meta": meta(after)}
                    batch = []
        rows = packer.flush() if packer is not None else None
        if rows:
            stats["batches"] += 1
            yield {**self._batch(rows, True), "_meta": meta({"done": True})}
        elif batch:
            stats["batches"] += 1
            yield {**self._batch(batch, False), "_meta": meta({"done": True})}
        yield {"_end": True, "_meta": meta({"done": True})}


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
        self._cursor = {"b": 0, "s": 0, "j": 0}  # train: a block at or before the position

    # -- counters --------------------------------------------------------------------------------
    @property
    def skips(self) -> SkipCounter:
        """All skipped samples so far (this rank), by reason, with example keys."""
        total = SkipCounter.from_state(self._base_skips.state_dict())
        for sd in self._worker_skips.values():
            total.merge(SkipCounter.from_state(sd))
        return total

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
                    "cursor": dict(self._cursor), "skips": self.skips.state_dict(), "stats": self.stats}
        return {"version": STATE_VERSION, "mode": st.mode, "seed": st.seed, "rank": st.rank,
                "world_size": st.world_size, "num_workers": self.num_workers, "shards": len(st.shards),
                "batch_size": st.batch_size, "workers": copy.deepcopy(self._states), "next_worker": self._next,
                "skips": self.skips.state_dict(), "stats": self.stats}

    def _order_key(self) -> dict:
        """What defines the global sample order: resuming needs all of it unchanged."""
        st = self.stream
        return {"seed": st.seed, "shards": len(st.shards), "shuffle_buffer": st.shuffle_buffer}

    def load_state_dict(self, sd: dict) -> None:
        """Train: a state written by ANY rank, world size or worker count continues the same global
        order (a state taken mid-step also needs the same micro-batch size, accumulation and world size).
        The skip and sample counters come back only on the rank that wrote them. Eval: the same rank,
        world size, worker count, shards and batch size."""
        st = self.stream
        if st.mode == "train":
            if sd.get("version") != TRAIN_STATE_VERSION or sd.get("mode") != "train":
                raise ValueError(f"data loader state is not a train state of version {TRAIN_STATE_VERSION} "
                                 f"(got mode {sd.get('mode')!r}, version {sd.get('version')!r})")
            want = self._order_key()
            diff = {k: (sd["order"].get(k), v) for k, v in want.items() if sd["order"].get(k) != v}
            if diff:
                raise ValueError(f"data loader state does not match this loader (saved, now): {diff}; the global "
                                 "sample order needs the same seed, shards and shuffle_buffer to continue")
            if int(sd["micro"]) and sd["layout"] != st.layout.as_dict():
                raise ValueError(f"data loader state was taken {sd['micro']} micro-batches into a step with layout "
                                 f"{sd['layout']}; this loader has {st.layout.as_dict()}: resume from a step boundary")
            self._reset()
            self._origin, self._handed = int(sd["position"]), int(sd["micro"])
            self._cursor = dict(sd["cursor"])
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
        st = copy.copy(self.stream)
        skips, stats = SkipCounter(), Counter()
        for path in st.shards:
            for raw in st._read(path, skips, 0):
                if st._prepare_counted(raw, skips, stats) is not None:
                    return
        raise NoUsableSampleError(f"{st.mode} data: " + no_usable_message(st.shards, skips))

    # -- iteration -------------------------------------------------------------------------------
    def _dataloader(self, stream: SampleStream):
        kw: Dict[str, Any] = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": self.multiprocessing_context,
                  "worker_init_fn": ignore_stop_signals}
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                               pin_memory=self.pin_memory, **kw))

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
        stream.resume = {**here, "cursor": dict(self._cursor)}
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
            self._cursor = m["cursor"]
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


def _check_specs(student_spec: InputSpec, teacher_spec: Optional[InputSpec], text_only: bool) -> None:
    specs = [("student", student_spec)] + ([("teacher", teacher_spec)] if teacher_spec is not None else [])
    for name, spec in specs:
        check_spec(spec, name)
        if not text_only and not spec.is_multimodal:
            raise ValueError(f"{name} InputSpec is text-only (no image_transform/tokens_per_image) but "
                             "text_only=False; set text_only=True for the LLM path")
    if teacher_spec is not None and teacher_spec.tokenizer is not student_spec.tokenizer:
        vs, vt = student_spec.tokenizer.get_vocab(), teacher_spec.tokenizer.get_vocab()
        if vs != vt:
            raise ValueError(f"teacher and student tokenizers differ ({len(vt)} vs {len(vs)} tokens); "
                             "distillation needs a shared vocabulary")


def build_loader(
    shards: ShardSpec, student_spec: InputSpec, teacher_spec: Optional[InputSpec] = None, *,
    mode: str = "train", batch_size: int = 8, max_length: int = 2048, num_workers: int = 2, seed: int = 0,
    rank: int = 0, world_size: int = 1, caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION,
    text_only: bool = False, pack: bool = False, shuffle_buffer: int = 1000,
    pad_to_multiple_of: Optional[int] = None, pin_memory: bool = False, prefetch_factor: Optional[int] = None,
    multiprocessing_context: Optional[str] = None, companion: Any = None, grad_accum: int = 1,
    shard_cache: Optional[NodeCache] = None, prompt_tokens: int = 0,
) -> Loader:
    """The one entry point: shards + per-model InputSpecs -> a resumable iterable of batches.

    Startup errors (ValueError / FileNotFoundError, naming the culprit): missing shard, empty spec,
    unknown mode, packing without text_only, a text-only spec for image data, an InputSpec whose image
    token or chat template cannot work, teacher/student tokenizers with different vocabularies.

    ``companion``: a teacher cache (taid_vlm.teacher_cache.TeacherCache) instead of ``teacher_spec``:
    batches then carry ``"teacher_topk": {"ids" [K, k], "logprobs" [K, k], "log_tail" [K]}`` aligned
    with ``student.loss_targets`` (and no ``"teacher"`` entry). Every shard's companion is found and
    checked here, at startup.

    ``shard_cache``: a NodeCache (node_cache.py) through which remote shards (``http(s)://``, ``pipe:`` ...)
    are fetched once per node and read locally; without one, gopen streams them on every read.

    Train mode slices ONE global sample order (global_order.py): ``grad_accum`` and ``world_size`` say
    how, so that an optimizer step (``grad_accum`` micro-batches on every rank) sees the same samples
    whatever the world size; ``batch_size`` counts samples (documents, when packed) per micro-batch.

    ``prompt_tokens``: a raw-text document's prompt is its first that many tokens (render.Renderer).
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if pack and not text_only:
        raise ValueError("pack=True is only for text-only data: set text_only=True")
    paths = expand_shards(shards)
    companion_paths = None
    if companion is not None:
        if teacher_spec is not None:
            raise ValueError("give teacher_spec (online teacher) or companion (cached teacher), not both")
        companion_paths = companion.companions(paths)
    _check_specs(student_spec, teacher_spec, text_only)
    G = world_size * max(1, num_workers)
    if mode == "eval" and len(paths) < G:
        log.warning("eval: %d shards < %d ranks x workers; every worker reads all shards and keeps its share "
                    "of the samples (exact, but each shard is read %d times)", len(paths), G, G)
    stream = SampleStream(paths, student_spec, teacher_spec, mode=mode, batch_size=batch_size,
                          max_length=max_length, seed=seed, rank=rank, world_size=world_size,
                          caption_instruction=caption_instruction, text_only=text_only, pack=pack,
                          shuffle_buffer=shuffle_buffer, pad_to_multiple_of=pad_to_multiple_of,
                          companion=companion, companion_paths=companion_paths, grad_accum=grad_accum,
                          shard_cache=shard_cache, prompt_tokens=prompt_tokens)
    return Loader(stream, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                  multiprocessing_context=multiprocessing_context)
