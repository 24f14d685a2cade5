"""Streaming WebDataset shards into teacher/student batches, resumable, across nodes and workers.

Layout of the stream (all inside each DataLoader worker, so decode/transform/tokenize run in parallel):

  shard sequence (this worker's)  ->  raw samples (webdataset tar iterators, counted error handler)
  ->  block shuffle (train)  ->  decode + validate (samples.py)  ->  render per model (render.py)
  ->  align (align.py)  ->  batch + collate, or pack (collate.py)  ->  main process (reorder, state)

Splitting. Global worker ``g = rank * num_workers + worker``, ``G = world_size * num_workers``.
- train (endless, resampled): each worker walks its own endless sequence of rounds; a round is a
  random permutation of ALL shards (seeded by seed, g, round), so every worker reaches every shard,
  any number of shards works, and there is no epoch boundary to synchronise.
- eval (exact, single pass): with ``len(shards) >= G`` worker g reads ``shards[g::G]`` in order;
  with fewer shards every worker reads all of them and keeps raw sample ``j`` of shard ``s`` iff
  ``(s + j) % G == g``. Either way every sample is seen exactly once over all ranks and workers.

Shuffling (train): raw samples (still bytes) are shuffled in consecutive blocks of ``shuffle_buffer``,
each block permuted by an RNG seeded by (seed, g, block). Unlike webdataset's rolling shuffle buffer,
a block has a start position that can be written down, which makes the position exact and cheap.

Position. A worker's position is ``{s, j, b, o}``: block ``b`` starts at raw sample ``j`` of the
``s``-th shard of the worker's sequence, and its first ``o`` samples were consumed. Every batch carries
the position after its last sample; the main process keeps, per worker, the position of the last
batch it HANDED OUT (prefetched batches do not count), and hands batches out in a fixed cyclic
worker order. Resuming re-opens shard ``s``, skips ``j`` raw samples without decoding, re-reads and
re-permutes the block, skips ``o`` samples, and continues. The result: the same batches as an
uninterrupted run, for the same seed, world size and worker count. (Random image augmentations
inside a spec's transform are not replayed.)

Companion shards (a cached teacher, taid_vlm.teacher_cache): with ``companion=``, every data shard is
read together with its companion tar, which holds one record per raw data sample under the same
``__key__`` in the same order. The two are zipped raw sample by raw sample (the key checked) BEFORE
the block shuffle, so shuffling, splitting and resume move a sample and its cached teacher together.
A key mismatch is an error (the companion was written for other data); a companion that ends early
(truncated) makes the rest of the shard's samples counted skips (``teacher_cache_missing``).
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
import tarfile
from collections import Counter, deque
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ..spec import InputSpec
from .align import align_labels
from .collate import GreedyPacker, collate, collate_packed
from .formats import DEFAULT_CAPTION_INSTRUCTION
from .render import IGNORE_INDEX, Renderer, check_spec, pad_token_id
from .samples import decode_sample
from .shards import ShardSpec, expand_shards
from .skips import TAR_ERROR, TRUNCATED_TAR, UNALIGNED, SampleError, SkipCounter

log = logging.getLogger(__name__)

COMPANION_FIELD = "__companion__"
COMPANION_SKIP = "__companion_skip__"

STATE_VERSION = 1


def _identity(x):
    return x


def read_shard(path: str, skips: SkipCounter, start: int = 0) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard (webdataset's tar iterator + group_by_keys); the first ``start`` are
    skipped undecoded. Read errors are counted (truncated tar: samples before the cut survive)."""

    seen = set()  # one truncated tar raises twice (member read, then the header walk): count it once

    def count(exn: BaseException) -> None:
        msg = str(exn).lower()
        reason = TRUNCATED_TAR if ("unexpected end" in msg or isinstance(exn, EOFError)) else TAR_ERROR
        if reason not in seen:
            skips.add(reason, path)
            seen.add(reason)

    def handler(exn: Exception) -> bool:
        count(exn)
        return True

    def files():
        try:
            stream = gopen(path)
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
                              field: str = "topk", skip_field: str = "skip") -> Iterator[Dict[str, Any]]:
    """``read_shard`` of the data shard, each raw sample carrying its companion record under
    ``COMPANION_FIELD`` (bytes) or the reason the companion writer skipped it under ``COMPANION_SKIP``.
    Both tars are walked from the start (raw samples are not decoded), so the pairing is by position
    and key whatever ``start`` is; the first ``start`` pairs are dropped."""
    comp = read_shard(companion_path, skips)
    c = next(comp, None)
    for j, raw in enumerate(read_shard(path, skips)):
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
                 companion_paths: Optional[Dict[str, str]] = None):
        super().__init__()
        self.shards = shards
        self.mode = mode
        self.batch_size, self.max_length = batch_size, max_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.caption_instruction, self.text_only, self.pack = caption_instruction, text_only, pack
        self.shuffle_buffer = shuffle_buffer if mode == "train" else 1
        self.pad_to_multiple_of = pad_to_multiple_of
        self.student_r = Renderer(student, max_length)
        self.teacher_r = None if teacher is None else (
            self.student_r if teacher is student else Renderer(teacher, max_length))
        self.pad_ids = [pad_token_id(student.tokenizer)] + ([] if teacher is None else [pad_token_id(teacher.tokenizer)])
        self.resume: Dict[int, dict] = {}
        self.companion = companion  # a teacher cache (taid_vlm.teacher_cache.TeacherCache) or None
        self.companion_paths = companion_paths or {}

    # -- raw samples in this worker's order ------------------------------------------------------
    def _shard_at(self, g: int, G: int, s: int) -> Optional[str]:
        n = len(self.shards)
        if self.mode == "train":
            order = list(range(n))
            random.Random(f"shards:{self.seed}:{g}:{s // n}").shuffle(order)
            return self.shards[order[s % n]]
        mine = self.shards[g::G] if n >= G else self.shards
        return mine[s] if s < len(mine) else None

    def _raw(self, g: int, G: int, s: int, j: int, skips: SkipCounter):
        """Yield ``(s, j_after, raw)`` from position (s, j) on."""
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
            if empty_run > len(self.shards):
                raise RuntimeError(f"no readable sample in any of {len(self.shards)} shards ({skips.summary()})")

    def _read(self, path: str, skips: SkipCounter, start: int):
        if self.companion is None:
            return read_shard(path, skips, start=start)
        return read_shard_with_companion(path, self.companion_paths[path], skips, start=start)

    def _blocks(self, g: int, G: int, pos: dict, skips: SkipCounter):
        """Yield ``(raw, position_after)`` in (block-)shuffled order."""
        bs, bj, b, o = pos["s"], pos["j"], pos["b"], pos["o"]
        raw = self._raw(g, G, bs, bj, skips)
        K = max(1, self.shuffle_buffer)
        while True:
            block = list(itertools.islice(raw, K))
            if not block:
                return
            end_s, end_j = block[-1][0], block[-1][1]
            order = list(range(len(block)))
            if K > 1:
                random.Random(f"block:{self.seed}:{g}:{b}").shuffle(order)
            for idx in range(o, len(block)):
                after = ({"s": bs, "j": bj, "b": b, "o": idx + 1} if idx + 1 < len(block)
                         else {"s": end_s, "j": end_j, "b": b + 1, "o": 0})
                yield block[order[idx]][2], after
            bs, bj, b, o = end_s, end_j, b + 1, 0

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
        out["keys"] = [it[0] for row in items for it in row] if packed else [it[0] for it in items]
        if self.companion is not None:  # records in loss_targets order: sample-major, then token order
            records = [it[3] for row in items for it in row] if packed else [it[3] for it in items]
            topk = self.companion.collate(records)
            if not torch.equal(topk.pop("targets").long(), out["student"]["loss_targets"]):
                raise RuntimeError(f"teacher cache rows do not line up with the student's supervised tokens "
                                   f"(samples {out['keys'][:4]}); this is a bug")
            out["teacher_topk"] = topk
        return out

    def __iter__(self):
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        g, G = self.rank * W + w, self.world_size * W
        pos = self.resume.get(w) or {"s": 0, "j": 0, "b": 0, "o": 0}
        skips, stats = SkipCounter(), Counter()

        def meta(state):
            return {"worker": w, "state": state, "skips": skips.state_dict(), "stats": dict(stats)}

        if pos.get("done"):
            yield {"_end": True, "_meta": meta(pos)}
            return
        packer = GreedyPacker(self.batch_size, self.max_length) if self.pack else None
        batch: list = []
        for raw, after in self._blocks(g, G, pos, skips):
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
        return {"version": STATE_VERSION, "mode": st.mode, "seed": st.seed, "rank": st.rank,
                "world_size": st.world_size, "num_workers": self.num_workers, "shards": len(st.shards),
                "batch_size": st.batch_size, "workers": copy.deepcopy(self._states), "next_worker": self._next,
                "skips": self.skips.state_dict(), "stats": self.stats}

    def load_state_dict(self, sd: dict) -> None:
        st = self.stream
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

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Dict[str, Any]]:
        if self._finished:  # eval: a finished pass is followed by a fresh full one
            self._reset()
        self._fold_counters()
        n_slots = max(1, self.num_workers)
        stream = copy.copy(self.stream)
        stream.resume = copy.deepcopy(self._states)
        kw: Dict[str, Any] = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": self.multiprocessing_context}
        dl = DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                        pin_memory=self.pin_memory, **kw)
        active = [w for w in range(n_slots) if not self._states.get(w, {}).get("done")]
        pending: Dict[int, deque] = {w: deque() for w in range(n_slots)}
        it = iter(dl)
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
        if self.stream.mode == "eval":
            log.info("eval pass done: %s", self.skips.summary())
            self._finished = True

    def __repr__(self) -> str:
        st = self.stream
        return (f"Loader(mode={st.mode}, shards={len(st.shards)}, batch_size={st.batch_size}, "
                f"workers={self.num_workers}, rank={st.rank}/{st.world_size})")


def build_loader(
    shards: ShardSpec, student_spec: InputSpec, teacher_spec: Optional[InputSpec] = None, *,
    mode: str = "train", batch_size: int = 8, max_length: int = 2048, num_workers: int = 2, seed: int = 0,
    rank: int = 0, world_size: int = 1, caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION,
    text_only: bool = False, pack: bool = False, shuffle_buffer: int = 1000,
    pad_to_multiple_of: Optional[int] = None, pin_memory: bool = False, prefetch_factor: Optional[int] = None,
    multiprocessing_context: Optional[str] = None, companion: Any = None,
) -> Loader:
    """The one entry point: shards + per-model InputSpecs -> a resumable iterable of batches.

    Startup errors (ValueError / FileNotFoundError, naming the culprit): missing shard, empty spec,
    unknown mode, packing without text_only, a text-only spec for image data, an InputSpec whose image
    token or chat template cannot work, teacher/student tokenizers with different vocabularies.

    ``companion``: a teacher cache (taid_vlm.teacher_cache.TeacherCache) instead of ``teacher_spec``:
    batches then carry ``"teacher_topk": {"ids" [K, k], "logprobs" [K, k], "log_tail" [K]}`` aligned
    with ``student.loss_targets`` (and no ``"teacher"`` entry). Every shard's companion is found and
    checked here, at startup.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
    G = world_size * max(1, num_workers)
    if mode == "eval" and len(paths) < G:
        log.warning("eval: %d shards < %d ranks x workers; every worker reads all shards and keeps its share "
                    "of the samples (exact, but each shard is read %d times)", len(paths), G, G)
    stream = SampleStream(paths, student_spec, teacher_spec, mode=mode, batch_size=batch_size,
                          max_length=max_length, seed=seed, rank=rank, world_size=world_size,
                          caption_instruction=caption_instruction, text_only=text_only, pack=pack,
                          shuffle_buffer=shuffle_buffer, pad_to_multiple_of=pad_to_multiple_of,
                          companion=companion, companion_paths=companion_paths)
    return Loader(stream, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                  multiprocessing_context=multiprocessing_context)
