"""Run the teacher once over the shards and write its top-k (or its final hidden states, ``kind="hidden"``,
with its lm_head once) beside them (companion shards + manifest).

Order and content. Each data shard is read exactly as the training pipeline reads it (read_shard: the
same raw samples in file order), every raw sample gets one companion record under its ``__key__``: the
top-k of the teacher's rendering (its own chat template, image transform and image-token count, cut
at ``data.max_length``) at each supervised text token, or a ``skip`` record when the sample cannot be
rendered (corrupt image, no answer, too long, ...). Teacher logits are computed exactly as the online
chunked loss computes them (``hidden @ lm_head.T`` in the teacher's dtype, then float32, first
``len(tokenizer)`` rows), so a cache with k = V reproduces the online loss.

Processes. One process, or many under the deepspeed launcher with the training run's teacher placement:
shards are dealt round-robin over ranks; with ``teacher.placement: zero3`` the ranks step in lockstep
(a rank that ran out of work repeats its last batch and discards the result) because the sharded
teacher gathers its parameters collectively. Each finished companion shard is renamed into place and
its statistics written under ``.parts/``; a rerun skips finished shards (``overwrite=False``). Rank 0
writes ``manifest.json`` last.

Place. Above the trainer (it reuses ``train``'s model building, placement and launch pieces) and above
``teacher_cache`` (the format, manifest and reader, which the trainer imports): no package imports it but
the ``data_tools/cache_teacher.py`` command.

Memory. A shard is streamed: rendered samples (pixels included) are held for at most two batches (the
batch being run and the one read ahead to know whether it is the shard's last), never a whole shard.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from taid_vlm.data.collate import collate
from taid_vlm.data.formats import DEFAULT_CAPTION_INSTRUCTION
from taid_vlm.data.prepare import Preparer
from taid_vlm.data.render import IGNORE_INDEX, pad_token_id
from taid_vlm.data.shard_index import build_index, write_sidecar
from taid_vlm.data.shard_io import read_shard
from taid_vlm.data.skips import SampleError, SkipCounter
from taid_vlm.losses import OnlineTeacher
from taid_vlm.losses.chunked import default_chunk_size
from taid_vlm.losses.teacher_source import TAILS
from taid_vlm.progress import LoopProgress
from taid_vlm.teacher_cache import format as fmt
from taid_vlm.teacher_cache.lm_head import save_lm_head
from taid_vlm.teacher_cache.manifest import (FORMAT, HIDDEN_VERSION, KINDS, VERSION, rendering_hash, rendering_settings,
                                             totals, vocab_hash, weights_fingerprint, write_manifest)
# the trainer's own pieces: the writer builds, places and feeds the teacher exactly as a training run does
from taid_vlm.train.components import build_role_model, place_teacher, teacher_dtype
from taid_vlm.train.device import to_device
from taid_vlm.train.launch_env import all_reduce_sum, barrier, init_distributed
from taid_vlm.train.preflight import all_shards, shard_lists
from taid_vlm.train.synthetic import ensure_synthetic_data
from taid_vlm.train.zero3 import gathered

log = logging.getLogger("taid_vlm.teacher_cache")

PARTS = ".parts"


def topk_from_hidden(h: torch.Tensor, w: torch.Tensor, k: int, chunk: Optional[int] = None):
    """[K, H] hidden, [V, H] lm_head -> (ids int32 [K, k], logprobs float32 [K, k], log_tail float32 [K]),
    chunk by chunk (no [K, V] tensor). Logits exactly as the chunked loss gets them (the same
    OnlineTeacher rows: matmul in the model dtype, then float32; float64 stays float64)."""
    n, v = h.shape[0], w.shape[0]
    dtype = torch.promote_types(h.dtype, torch.float32)
    ids = torch.empty(n, k, dtype=torch.int32, device=h.device)
    lps = torch.empty(n, k, dtype=dtype, device=h.device)
    tail = torch.empty(n, dtype=dtype, device=h.device)
    c = chunk or default_chunk_size(n, v)
    buf = torch.empty(min(c, max(n, 1)), v, dtype=dtype, device=h.device)
    source = OnlineTeacher(h, w)
    for start in range(0, n, c):
        end = min(start + c, n)
        x = torch.log_softmax(source.fill(buf[: end - start], start, end), -1)
        values, index = x.topk(k, -1, sorted=True)
        ids[start:end], lps[start:end] = index.to(torch.int32), values
        # the tail's log-mass as a log-sum-exp over the rest: exact even when it is tiny (1 - sum would cancel)
        tail[start:end] = torch.logsumexp(x.scatter_(1, index, float("-inf")), -1)
    return ids, lps, tail


def companion_names(paths: Sequence[str], split: str) -> List[str]:
    """``split/<path relative to the split's common folder>``: the data shards' own file names."""
    if not paths:
        return []
    real = [os.path.realpath(p) for p in paths]
    root = os.path.commonpath(real) if len(real) > 1 else os.path.dirname(real[0])
    return [f"{split}/{os.path.relpath(p, root)}" for p in real]


class _ShardJob:
    def __init__(self, split: str, source: str, companion: str):
        self.split, self.source, self.companion = split, source, companion


def _pending_batches(job: _ShardJob, preparer: Preparer, batch_size: int, stats: dict):
    """Yield lists of ``(key, Rendered | reason)`` in file order, each holding at most ``batch_size``
    renderable samples (skips ride along in place, so records are written in data order)."""
    skips = SkipCounter()
    pending: list = []
    n_ok = 0
    for raw in read_shard(job.source, skips):
        key = str(raw.get("__key__"))
        stats["samples"] += 1
        try:
            pending.append((key, preparer(raw, Counter()).parts[0]))  # the loader's own decode + render
            n_ok += 1
        except SampleError as e:
            pending.append((key, e.reason))
            stats["skipped"][e.reason] = stats["skipped"].get(e.reason, 0) + 1
        if n_ok == batch_size:
            yield pending
            pending, n_ok = [], 0
    if pending:
        yield pending
    for reason, n in skips.counts.items():  # read errors: the samples behind them do not exist for anyone
        stats["read_errors"][reason] = stats["read_errors"].get(reason, 0) + n


def _with_last_flag(batches: Iterator[list]) -> Iterator[Tuple[list, bool]]:
    """(batch, is_last) with one batch of look-ahead; a shard without samples gives ([], True)."""
    prev = next(batches, None)
    if prev is None:
        yield [], True
        return
    for nxt in batches:
        yield prev, False
        prev = nxt
    yield prev, True


def _first_renderable(jobs, preparer: Preparer):
    for job in jobs:
        for raw in read_shard(job.source, SkipCounter()):
            item = preparer.counted(raw, SkipCounter(), Counter())
            if item is not None:
                return item.parts[0]
    raise ValueError("no shard holds a single sample the teacher can render")


class CacheLayout(NamedTuple):
    """What each record holds: ``kind`` "topk" (k entries, ``logprob_dtype``; ``tail`` is the tail model
    the reader applies) or "hidden" (the teacher's final hidden state in ``hidden_dtype``)."""
    kind: str = "topk"
    k: Optional[int] = 64
    logprob_dtype: str = "float16"
    hidden_dtype: Optional[str] = None
    tail: str = "uniform"

    def encode(self, targets, rows) -> Tuple[str, bytes]:
        """(tar field, record bytes) of one sample's rows."""
        if self.kind == "hidden":
            return fmt.HIDDEN_FIELD, fmt.encode_hidden(targets.numpy(), rows, self.hidden_dtype)
        ids, lps, tail = rows
        return fmt.TOPK_FIELD, fmt.encode(targets.numpy(), ids.numpy(), lps.numpy(), tail.numpy(), self.logprob_dtype)


class _TeacherRecords:
    """The placed teacher on a batch of rendered samples -> per sample (n tokens, tar field, record bytes).
    In lockstep (ZeRO-3 teacher, several ranks) a rank without work still runs a dummy batch, because the
    sharded teacher gathers its parameters collectively."""

    def __init__(self, teacher, pad_id: int, vocab_size: int, layout: CacheLayout, device, dummy=None):
        self.teacher, self.pad_id, self.vocab_size, self.layout, self.device = teacher, pad_id, vocab_size, layout, device
        self.dummy = dummy

    def _rows(self, rendered: list):
        """(teacher inputs, per-token rows): the hidden states [K, H], or the top-k triple."""

        t_in = to_device(collate(rendered, self.pad_id), self.device)
        h = self.teacher.hidden(t_in)
        if self.layout.kind == "hidden":
            return t_in, h
        with self.teacher.output_weight() as w:
            return t_in, topk_from_hidden(h, w[: self.vocab_size], self.layout.k)

    def __call__(self, items: list) -> list:
        rendered = [r for _, r in items if not isinstance(r, str)]
        if not rendered:
            if self.dummy is not None:  # every rank must run the sharded teacher the same number of times
                self._rows([self.dummy])
            return []
        t_in, rows = self._rows(rendered)
        counts = (t_in["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
        targets = t_in["loss_targets"].to(torch.int32).cpu().split(counts)
        if self.layout.kind == "hidden":
            per_sample = rows.cpu().split(counts)
        else:
            ids, lps, tail = rows
            per_sample = zip(ids.cpu().split(counts), lps.float().cpu().split(counts), tail.float().cpu().split(counts))
        return [(int(t.shape[0]), *self.layout.encode(t, r)) for t, r in zip(targets, per_sample)]


# --compress: the whole companion gzipped (smallest, read whole), each record gzipped in a plain tar (read
# by byte range), or plain; the manifest's "compression" names them as below (None: plain)
COMPRESSIONS = {"stream": "gzip", "records": "gzip-records", "none": None}


def compression_mode(compress) -> str:
    """``compress`` as write_cache takes it (True / False as before, or a COMPRESSIONS name) -> the name."""
    mode = {True: "stream", False: "none", None: "none"}.get(compress, compress)
    if mode not in COMPRESSIONS:
        raise ValueError(f"compress must be one of {sorted(COMPRESSIONS)}, got {compress!r}")
    return mode


class _CompanionShard:
    """One companion tar being written to ``NAME.tmp`` (gzip level 1 as ``compress`` says), renamed into place
    and its statistics stored under ``.parts/`` by ``finish``."""

    def __init__(self, out: Path, job: _ShardJob, compress: str):
        import webdataset as wds

        self.out, self.job = out, job
        self.final = out / job.companion
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.raw_file = open(self.tmp, "wb")
        self.stream = (gzip.GzipFile(filename="", fileobj=self.raw_file, mode="wb", compresslevel=1, mtime=0)
                       if compress == "stream" else self.raw_file)
        self.per_record = compress == "records"
        self.writer = wds.TarWriter(self.stream, mtime=0)
        self.cached = self.tokens = self.payload = 0

    def write(self, items: list, results: list) -> None:
        """One record per item, in data order: the teacher's rows, or the reason it could not render."""
        results = iter(results)
        for key, r in items:
            if isinstance(r, str):
                self.writer.write({"__key__": key, fmt.SKIP_FIELD: r.encode()})
                continue
            n, field, rec = next(results)
            self.writer.write({"__key__": key, field: fmt.compress_record(rec) if self.per_record else rec})
            self.cached += 1
            self.tokens += n
            self.payload += len(rec)

    def finish(self, stats: dict) -> dict:
        self.writer.close()
        if self.stream is not self.raw_file:
            self.stream.close()
        self.raw_file.flush()
        os.fsync(self.raw_file.fileno())
        self.raw_file.close()
        os.replace(self.tmp, self.final)
        if self.stream is self.raw_file:  # a plain tar (records gzipped or not): indexed now, read by byte range
            write_sidecar(build_index(str(self.final)))
        job = self.job
        entry = {"split": job.split, "source": os.path.realpath(job.source), "companion": job.companion,
                 "source_bytes": os.path.getsize(job.source), "samples": stats["samples"],
                 "cached": self.cached, "skipped": stats["skipped"], "read_errors": stats["read_errors"],
                 "supervised_tokens": self.tokens, "bytes": os.path.getsize(self.final), "payload_bytes": self.payload}
        _part_path(self.out, job).write_text(json.dumps(entry))
        return entry


def _part_path(out: Path, job: _ShardJob) -> Path:
    return out / PARTS / (job.companion.replace("/", "__") + ".json")


def _processes(cfg):
    """(rank, world, device): a process group under a launcher or for a ZeRO-3 teacher; else one plain
    process (e.g. from Python), which needs none for a replicated teacher."""

    if "RANK" in os.environ or cfg.teacher.placement == "zero3":
        return init_distributed()
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prepare_folder(out: Path, rank: int, overwrite: bool) -> None:

    if rank == 0:
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in (out / PARTS).glob("*.json"):
                p.unlink()
        if (out / "manifest.json").exists():
            (out / "manifest.json").unlink()  # an older manifest must not vouch for a cache being rewritten
    barrier()


def _shard_jobs(cfg, splits: Sequence[str]) -> List[_ShardJob]:
    jobs: List[_ShardJob] = []
    for split, listed in shard_lists(cfg, splits).items():
        paths = all_shards(listed)
        jobs += [_ShardJob(split, p, c) for p, c in zip(paths, companion_names(paths, split))]
    if not jobs:
        raise ValueError(f"no shards to cache: data.{' / data.'.join(splits)} not set")
    return jobs


def _work(mine: List[_ShardJob], out: Path, preparer: Preparer, bs: int, resumable: bool, rank: int):
    """(job, items, stats, is_last_batch_of_shard) for this rank, streamed; shards already finished
    (companion and part file present) are skipped when ``resumable``."""
    for job in mine:
        if resumable and (out / job.companion).is_file() and _part_path(out, job).is_file():
            log.info("rank %d: %s already cached, skipped", rank, job.companion)
            continue
        stats = {"samples": 0, "skipped": {}, "read_errors": {}}
        for items, last in _with_last_flag(_pending_batches(job, preparer, bs, stats)):
            yield job, items, stats, last


def _write_companions(work: Iterator, run_teacher: _TeacherRecords, out: Path, lockstep: bool, device, rank: int,
                      compress: str) -> None:

    shard = None
    shown = LoopProgress(f"teacher cache (rank {rank})", unit="samples", enabled=rank == 0)
    while True:
        nxt = next(work, None)
        if lockstep and all_reduce_sum([1.0 if nxt is not None else 0.0], device)[0] == 0:
            break
        if nxt is None:
            if not lockstep:
                break
            run_teacher([])  # this rank is done: a dummy forward keeps the collective gathers matched
            continue
        job, items, stats, last = nxt
        if shard is None:
            shard = _CompanionShard(out, job, compress)
        shard.write(items, run_teacher(items))
        shown.advance(len(items))
        if last:
            entry = shard.finish(stats)
            log.info("rank %d: %s: %d samples cached, %d skipped, %d tokens, %.1f bytes/token", rank, job.companion,
                     shard.cached, sum(stats["skipped"].values()), shard.tokens,
                     entry["bytes"] / max(shard.tokens, 1))
            shard = None
    shown.close()


def cache_layout(kind: str = "topk", k: Optional[int] = 64, logprob_dtype: str = "float16",
                 hidden_dtype: Optional[str] = None, tail: str = "uniform") -> CacheLayout:
    """A checked CacheLayout (``hidden_dtype`` None: the teacher's own dtype, filled in by write_cache)."""

    if kind not in KINDS:
        raise ValueError(f"cache format must be one of {KINDS}, got {kind!r}")
    if logprob_dtype not in fmt.DTYPE_CODES:
        raise ValueError(f"logprob_dtype must be one of {sorted(fmt.DTYPE_CODES)}, got {logprob_dtype!r}")
    if hidden_dtype is not None and hidden_dtype not in fmt.HIDDEN_DTYPE_CODES:
        raise ValueError(f"hidden_dtype must be one of {sorted(fmt.HIDDEN_DTYPE_CODES)}, got {hidden_dtype!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    return CacheLayout(kind, k if kind == "topk" else None, logprob_dtype, hidden_dtype if kind == "hidden" else None,
                       tail)


def _check_resumed_layout(out: Path, layout: CacheLayout, rank: int, overwrite: bool) -> None:
    """Finished shards of an earlier run are reused only if they were written with the same layout."""
    if rank != 0:
        return
    path = out / PARTS / "layout.json"
    if path.is_file() and not overwrite and json.loads(path.read_text()) != layout._asdict():
        raise ValueError(f"{out} holds a cache being written with {path.read_text()}, not {json.dumps(layout._asdict())}: "
                         "pass --overwrite or another --out")
    path.write_text(json.dumps(layout._asdict()))


def write_cache(cfg, out, k: int = 64, splits: Sequence[str] = ("train", "val"), batch_size: Optional[int] = None,
                logprob_dtype: str = "float16", overwrite: bool = False, compress="stream", kind: str = "topk",
                hidden_dtype: Optional[str] = None, tail: str = "uniform") -> Optional[dict]:
    """Every rank calls this. Returns the manifest on rank 0 (None elsewhere). ``compress`` (COMPRESSIONS;
    True / False mean "stream" / "none"): "stream" gzips each companion tar (level 1; the file name stays
    ``.tar``, readers detect gzip by its magic bytes), which removes the tar headers' and paddings' zeros and
    the ids' zero high bytes at little CPU cost, but a reader must read it whole; "records" gzips each record
    alone inside a plain tar that readers seek into (index sidecar written beside it); "none": plain.
    ``kind``: "topk" (``k``, ``logprob_dtype``, ``tail``) or "hidden" (the teacher's final hidden states
    in ``hidden_dtype``, default the teacher's dtype, which makes the cache exact; lm_head stored once)."""

    layout = cache_layout(kind, k, logprob_dtype, hidden_dtype, tail)
    compress = compression_mode(compress)
    if cfg.teacher.model is None:
        raise ValueError("teacher.model: the cache writer needs the teacher model config")
    if kind == "hidden" and hidden_dtype is None:
        layout = layout._replace(hidden_dtype=str(teacher_dtype(cfg)).replace("torch.", ""))
    rank, world, device = _processes(cfg)
    torch.manual_seed(cfg.seed)  # as the trainer: a teacher built from a config gets the same random weights
    ensure_synthetic_data(cfg, rank)  # the tiny recipes generate their shards on first use
    out = Path(out).resolve()
    _prepare_folder(out, rank, overwrite)
    _check_resumed_layout(out, layout, rank, overwrite)

    if cfg.student.model is not None:  # the trainer builds the student first: the same RNG draws
        build_role_model(cfg.student.model, "student")
    model = build_role_model(cfg.teacher.model, "teacher")
    spec = model.input_spec
    vocab_size = len(spec.tokenizer)
    if kind == "topk" and not 1 <= k <= vocab_size:
        raise ValueError(f"--k must be in [1, {vocab_size}] (the tokenizer's vocabulary), got {k}")
    teacher = place_teacher(cfg, model, device, world)
    fingerprint = weights_fingerprint(teacher.model, gathered)
    lm_head = _store_lm_head(teacher, out, vocab_size, rank) if kind == "hidden" else None

    caption = cfg.data.caption_instruction or DEFAULT_CAPTION_INSTRUCTION
    preparer = Preparer(spec, None, max_length=cfg.data.max_length, caption_instruction=caption,
                        text_only=cfg.data.text_only)  # the teacher's rendering only
    jobs = _shard_jobs(cfg, splits)
    lockstep = cfg.teacher.placement == "zero3" and world > 1
    if lockstep and len(jobs) < world:
        raise ValueError(f"{len(jobs)} shards < {world} processes with a ZeRO-3 teacher: use at most {len(jobs)} processes")
    bs = int(batch_size or cfg.train.micro_batch_size)
    dummy = _first_renderable(jobs, preparer) if lockstep else None
    run_teacher = _TeacherRecords(teacher, pad_token_id(spec.tokenizer), vocab_size, layout, device, dummy)

    t0 = time.perf_counter()
    work = _work(jobs[rank::world], out, preparer, bs, not overwrite and not lockstep, rank)
    _write_companions(work, run_teacher, out, lockstep, device, rank, compress)
    elapsed = time.perf_counter() - t0
    barrier()
    if rank != 0:
        return None
    manifest = _manifest(cfg, spec, layout, vocab_size, compress, fingerprint, caption, _collect_parts(out, jobs),
                         {"processes": world, "seconds_rank0": round(elapsed, 3), "batch_size": bs}, lm_head)
    write_manifest(out, manifest)
    log.info("teacher cache %s: %s", out, json.dumps(manifest["totals"]))
    return manifest


def _store_lm_head(teacher, out: Path, vocab_size: int, rank: int) -> dict:
    """The teacher's lm_head (first ``vocab_size`` rows, its own dtype) into the cache; every rank gathers
    it (collective under ZeRO-3), rank 0 writes it."""

    with teacher.output_weight() as w:
        entry = save_lm_head(out, w[:vocab_size]) if rank == 0 else None
    barrier()
    return entry


def _manifest(cfg, spec, layout: CacheLayout, vocab_size: int, compress: str, fingerprint: str,
              caption: str, entries: List[dict], writer: dict, lm_head: Optional[dict]) -> dict:

    settings = rendering_settings(spec, cfg.data.max_length, cfg.data.text_only, caption)
    if layout.kind == "hidden":
        width = lm_head["shape"][1]
        what = {"version": HIDDEN_VERSION, "kind": "hidden", "k": None, "hidden_size": width,
                "hidden_dtype": layout.hidden_dtype, "lm_head": lm_head,
                "bytes_per_token_payload": fmt.hidden_bytes_per_token(width, layout.hidden_dtype)}
    else:
        what = {"version": VERSION, "kind": "topk", "tail": layout.tail, "k": layout.k,
                "logprob_dtype": layout.logprob_dtype,
                "bytes_per_token_payload": fmt.bytes_per_token(layout.k, layout.logprob_dtype)}
    return {
        "format": FORMAT, **what, "complete": True, "vocab_size": vocab_size,
        "compression": COMPRESSIONS[compress],
        "teacher": {"config": json.loads(json.dumps(cfg.teacher.model, default=str)), "placement": cfg.teacher.placement,
                    "dtype": str(teacher_dtype(cfg)).replace("torch.", ""), "weights_fingerprint": fingerprint},
        "tokenizer": {"vocab_hash": vocab_hash(spec.tokenizer), "size": vocab_size},
        "rendering": settings, "rendering_hash": rendering_hash(settings),
        "shards": entries, "totals": totals(entries),
        "writer": writer,
    }


def _collect_parts(out: Path, jobs: List[_ShardJob]) -> List[dict]:
    entries = []
    for job in jobs:
        part = _part_path(out, job)
        if not part.is_file():
            raise RuntimeError(f"companion {job.companion} of {job.source} was not written by any rank")
        entries.append(json.loads(part.read_text()))
    return entries
