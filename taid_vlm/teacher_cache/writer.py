"""Run the teacher once over the shards and write its top-k beside them (companion shards + manifest).

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
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from . import format as fmt
from .manifest import (FORMAT, VERSION, rendering_hash, rendering_settings, totals, vocab_hash, weights_fingerprint,
                       write_manifest)

log = logging.getLogger("taid_vlm.teacher_cache")

PARTS = ".parts"


def topk_from_hidden(h: torch.Tensor, w: torch.Tensor, k: int, chunk: Optional[int] = None):
    """[K, H] hidden, [V, H] lm_head -> (ids int32 [K, k], logprobs float32 [K, k], log_tail float32 [K]),
    chunk by chunk (no [K, V] tensor). Logits as in the chunked loss: matmul in the model dtype, then
    float32 (float64 stays float64)."""
    from taid_vlm.losses.chunked import _matmul_into, default_chunk_size

    n, v = h.shape[0], w.shape[0]
    dtype = torch.promote_types(h.dtype, torch.float32)
    ids = torch.empty(n, k, dtype=torch.int32, device=h.device)
    lps = torch.empty(n, k, dtype=dtype, device=h.device)
    tail = torch.empty(n, dtype=dtype, device=h.device)
    c = chunk or default_chunk_size(n, v)
    buf = torch.empty(min(c, max(n, 1)), v, dtype=dtype, device=h.device)
    for start in range(0, n, c):
        end = min(start + c, n)
        x = _matmul_into(buf[: end - start], h[start:end], w)
        x = torch.log_softmax(x, -1)
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


def _pending_batches(job: _ShardJob, renderer, cfg_data: Dict[str, Any], batch_size: int, stats: dict):
    """Yield lists of ``(key, Rendered | reason)`` in file order, each holding at most ``batch_size``
    renderable samples (skips ride along in place, so records are written in data order)."""
    from taid_vlm.data.pipeline import read_shard
    from taid_vlm.data.samples import decode_sample
    from taid_vlm.data.skips import SampleError, SkipCounter

    skips = SkipCounter()
    pending: list = []
    n_ok = 0
    for raw in read_shard(job.source, skips):
        key = str(raw.get("__key__"))
        stats["samples"] += 1
        try:
            sample = decode_sample(raw, cfg_data["caption_instruction"], cfg_data["text_only"])
            pending.append((key, renderer(sample)))
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


def _first_renderable(jobs, renderer, data_cfg):
    from taid_vlm.data.pipeline import read_shard
    from taid_vlm.data.samples import decode_sample
    from taid_vlm.data.skips import SampleError, SkipCounter

    for job in jobs:
        for raw in read_shard(job.source, SkipCounter()):
            try:
                return renderer(decode_sample(raw, data_cfg["caption_instruction"], data_cfg["text_only"]))
            except SampleError:
                continue
    raise ValueError("no shard holds a single sample the teacher can render")


def write_cache(cfg, out, k: int = 64, splits: Sequence[str] = ("train", "val"), batch_size: Optional[int] = None,
                logprob_dtype: str = "float16", overwrite: bool = False, compress: bool = True) -> Optional[dict]:
    """Every rank calls this. Returns the manifest on rank 0 (None elsewhere). ``compress``: gzip each
    companion tar (level 1; the file name stays ``.tar``, readers detect gzip by its magic bytes). It
    removes the tar headers' and paddings' zeros and the ids' zero high bytes at little CPU cost."""
    from taid_vlm.data.collate import collate
    from taid_vlm.data.formats import DEFAULT_CAPTION_INSTRUCTION
    from taid_vlm.data.render import Renderer, pad_token_id
    from taid_vlm.data.shards import expand_shards
    from taid_vlm.train.components import build_role_model, place_teacher, shard_paths as _shards, teacher_dtype
    from taid_vlm.train.device import to_device
    from taid_vlm.train.launch_env import all_reduce_sum, barrier, init_distributed
    from taid_vlm.train.zero3 import gathered

    if logprob_dtype not in fmt.DTYPE_CODES:
        raise ValueError(f"logprob_dtype must be one of {sorted(fmt.DTYPE_CODES)}, got {logprob_dtype!r}")
    if cfg.teacher.model is None:
        raise ValueError("teacher.model: the cache writer needs the teacher model config")
    if "RANK" in os.environ or cfg.teacher.placement == "zero3":
        rank, world, device = init_distributed()
    else:  # one plain process (e.g. from Python): no process group needed for a replicated teacher
        rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from taid_vlm.train.synthetic import ensure_synthetic_data

    ensure_synthetic_data(cfg, rank)  # the tiny recipes generate their shards on first use
    out = Path(out).resolve()
    parts_dir = out / PARTS
    if rank == 0:
        parts_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in parts_dir.glob("*.json"):
                p.unlink()
        if (out / "manifest.json").exists():
            (out / "manifest.json").unlink()  # an older manifest must not vouch for a cache being rewritten
    barrier()

    model = build_role_model(cfg.teacher.model, "teacher")
    spec = model.input_spec
    vocab_size = len(spec.tokenizer)
    if not 1 <= k <= vocab_size:
        raise ValueError(f"--k must be in [1, {vocab_size}] (the tokenizer's vocabulary), got {k}")
    t_dtype = teacher_dtype(cfg)
    teacher = place_teacher(cfg, model, device, world)
    fingerprint = weights_fingerprint(teacher.model, gathered)

    caption = cfg.data.caption_instruction or DEFAULT_CAPTION_INSTRUCTION
    data_cfg = {"caption_instruction": caption, "text_only": cfg.data.text_only}
    renderer = Renderer(spec, cfg.data.max_length)
    pad_id = pad_token_id(spec.tokenizer)
    jobs: List[_ShardJob] = []
    for split in splits:
        spec_paths = getattr(cfg.data, split)
        if spec_paths is None:
            continue
        paths = expand_shards(_shards(cfg, spec_paths))
        jobs += [_ShardJob(split, p, c) for p, c in zip(paths, companion_names(paths, split))]
    if not jobs:
        raise ValueError(f"no shards to cache: data.{' / data.'.join(splits)} not set")
    mine = jobs[rank::world]
    lockstep = cfg.teacher.placement == "zero3" and world > 1
    if lockstep and len(jobs) < world:
        raise ValueError(f"{len(jobs)} shards < {world} processes with a ZeRO-3 teacher: use at most {len(jobs)} processes")
    bs = int(batch_size or cfg.train.micro_batch_size)

    dummy = _first_renderable(jobs, renderer, data_cfg) if lockstep else None

    def run_teacher(items) -> list:
        rendered = [r for _, r in items if not isinstance(r, str)]
        if not rendered:
            if lockstep:  # every rank must run the sharded teacher the same number of times
                h = teacher.hidden(to_device(collate([dummy], pad_id), device))
                with teacher.output_weight() as w:
                    topk_from_hidden(h, w[:vocab_size], k)
            return []
        t_in = to_device(collate(rendered, pad_id), device)
        h = teacher.hidden(t_in)
        with teacher.output_weight() as w:
            ids, lps, tail = topk_from_hidden(h, w[:vocab_size], k)
        counts = (t_in["labels"][:, 1:] != -100).sum(1).tolist()
        targets = t_in["loss_targets"].to(torch.int32).cpu().split(counts)
        ids, lps, tail = ids.cpu().split(counts), lps.float().cpu().split(counts), tail.float().cpu().split(counts)
        return list(zip(targets, ids, lps, tail))

    def shard_work() -> Iterator[tuple]:
        """(job, items, is_last_batch_of_shard) for this rank, skipping shards already finished."""
        for job in mine:
            final = out / job.companion
            part = parts_dir / (job.companion.replace("/", "__") + ".json")
            if not overwrite and not lockstep and final.is_file() and part.is_file():
                log.info("rank %d: %s already cached, skipped", rank, job.companion)
                continue
            stats = {"samples": 0, "skipped": {}, "read_errors": {}}
            job.stats = stats
            batches = list(_pending_batches(job, renderer, data_cfg, bs, stats)) or [[]]
            for i, items in enumerate(batches):
                yield job, items, i == len(batches) - 1

    import webdataset as wds

    t0 = time.perf_counter()
    work = shard_work()
    writer = current = None
    while True:
        nxt = next(work, None)
        if lockstep:
            active = all_reduce_sum([1.0 if nxt is not None else 0.0], device)[0]
            if active == 0:
                break
            if nxt is None:
                run_teacher([])  # this rank is done: a dummy forward keeps the collective gathers matched
                continue
        elif nxt is None:
            break
        job, items, last = nxt
        if current is not job:
            final = out / job.companion
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(final.name + ".tmp")
            raw_file = open(tmp, "wb")
            stream = gzip.GzipFile(filename="", fileobj=raw_file, mode="wb", compresslevel=1, mtime=0) if compress else raw_file
            writer = wds.TarWriter(stream, mtime=0)
            current, job.cached, job.tokens, job.payload = job, 0, 0, 0
        results = iter(run_teacher(items))
        for key, r in items:
            if isinstance(r, str):
                writer.write({"__key__": key, fmt.SKIP_FIELD: r.encode()})
                continue
            targets, ids, lps, tail = next(results)
            rec = fmt.encode(targets.numpy(), ids.numpy(), lps.numpy(), tail.numpy(), logprob_dtype)
            writer.write({"__key__": key, fmt.TOPK_FIELD: rec})
            job.cached += 1
            job.tokens += int(targets.shape[0])
            job.payload += len(rec)
        if last:
            writer.close()
            if stream is not raw_file:
                stream.close()
            raw_file.flush()
            os.fsync(raw_file.fileno())
            raw_file.close()
            final = out / job.companion
            tmp = final.with_name(final.name + ".tmp")
            os.replace(tmp, final)
            entry = {"split": job.split, "source": os.path.realpath(job.source), "companion": job.companion,
                     "source_bytes": os.path.getsize(job.source), "samples": job.stats["samples"],
                     "cached": job.cached, "skipped": job.stats["skipped"], "read_errors": job.stats["read_errors"],
                     "supervised_tokens": job.tokens, "bytes": os.path.getsize(final), "payload_bytes": job.payload}
            part = parts_dir / (job.companion.replace("/", "__") + ".json")
            part.write_text(json.dumps(entry))
            log.info("rank %d: %s: %d samples cached, %d skipped, %d tokens, %.1f bytes/token", rank, job.companion,
                     job.cached, sum(job.stats["skipped"].values()), job.tokens, entry["bytes"] / max(job.tokens, 1))
            current = writer = None
    elapsed = time.perf_counter() - t0
    barrier()
    if rank != 0:
        return None
    entries = []
    for job in jobs:
        part = parts_dir / (job.companion.replace("/", "__") + ".json")
        if not part.is_file():
            raise RuntimeError(f"companion {job.companion} of {job.source} was not written by any rank")
        entries.append(json.loads(part.read_text()))
    settings = rendering_settings(spec, cfg.data.max_length, cfg.data.text_only, caption)
    manifest = {
        "format": FORMAT, "version": VERSION, "complete": True, "k": k, "vocab_size": vocab_size,
        "logprob_dtype": logprob_dtype, "compression": "gzip" if compress else None, "bytes_per_token_payload": fmt.bytes_per_token(k, logprob_dtype),
        "teacher": {"config": json.loads(json.dumps(cfg.teacher.model, default=str)), "placement": cfg.teacher.placement,
                    "dtype": str(t_dtype).replace("torch.", ""), "weights_fingerprint": fingerprint},
        "tokenizer": {"vocab_hash": vocab_hash(spec.tokenizer), "size": vocab_size},
        "rendering": settings, "rendering_hash": rendering_hash(settings),
        "shards": entries, "totals": totals(entries),
        "writer": {"processes": world, "seconds_rank0": round(elapsed, 3), "batch_size": bs},
    }
    write_manifest(out, manifest)
    log.info("teacher cache %s: %s", out, json.dumps(manifest["totals"]))
    return manifest
