"""``manifest.json`` of a teacher cache: what was cached, with what, and how to check it at training time.

    {"format": "taid-vlm-teacher-topk", "version": 1, "complete": true,
     "kind": "topk", "tail": "uniform",       # absent in older caches: top-k, uniform tail
     "k": 64, "vocab_size": V, "logprob_dtype": "float16",
     "teacher": {"config": {...}, "placement": ..., "dtype": ..., "weights_fingerprint": "sha256:..."},
     "tokenizer": {"vocab_hash": "sha256:...", "size": V},
     "rendering": {"max_length", "text_only", "caption_instruction", "chat_template", "tokens_per_image",
                   "image_token", "image_token_id", "image_transform"},
     "rendering_hash": "sha256:...",
     "shards": [{"split", "source", "companion", "source_bytes", "samples", "cached", "skipped",
                 "supervised_tokens", "bytes", "payload_bytes"}, ...],
     "totals": {...}}

A hidden-state cache (version 2) has ``"kind": "hidden"``, ``"k": null``, ``"hidden_size": H``,
``"hidden_dtype"`` and ``"lm_head": {"file", "shape", "dtype", "bytes"}`` instead of the top-k fields.

The manifest is written last (atomically): a folder without one is an unfinished cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

FORMAT = "taid-vlm-teacher-topk"
VERSION = 1  # a top-k cache: readable by every taid-vlm that reads caches
HIDDEN_VERSION = 2  # a hidden-state cache: older readers refuse it by its version
VERSIONS = (VERSION, HIDDEN_VERSION)
KINDS = ("topk", "hidden")
MANIFEST = "manifest.json"


class CacheMismatchError(ValueError):
    """The cache does not fit this run; the message names the manifest field and the run's setting."""


def _sha256(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def vocab_hash(tokenizer) -> str:
    """Hash of the token -> id map (added tokens included): equal iff the vocabularies are."""
    return _sha256(sorted(tokenizer.get_vocab().items()))


def _transform_repr(transform) -> Optional[str]:
    if transform is None:
        return None
    return re.sub(r" at 0x[0-9a-f]+", "", repr(transform))  # no memory addresses: stable across processes


def rendering_settings(spec, max_length: int, text_only: bool, caption_instruction: str) -> Dict[str, Any]:
    """Everything that decides the teacher's token sequence (and so which positions were cached)."""
    from taid_vlm.data.render import resolve_template

    return {"max_length": int(max_length), "text_only": bool(text_only), "caption_instruction": caption_instruction,
            "chat_template": resolve_template(spec), "tokens_per_image": int(spec.tokens_per_image),
            "image_token": spec.image_token, "image_token_id": spec.image_token_id,
            "image_transform": _transform_repr(spec.image_transform)}


def rendering_hash(settings: Dict[str, Any]) -> str:
    return _sha256(settings)


def weights_fingerprint(model, gather=None) -> str:
    """Per tensor (parameters and buffers, by name): shape, dtype, float64 sum and sum of squares, and up
    to 1024 evenly strided values. Cheap on a 72B model, and any retrained or swapped weight changes it
    (not a cryptographic hash of every byte). ``gather(param)`` is a context manager (ZeRO-3)."""
    import contextlib

    import torch

    h = hashlib.sha256()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in sorted(tensors, key=lambda x: x[0]):
        ctx = gather(t) if gather is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            flat = t.detach().reshape(-1)
            stride = max(1, flat.numel() // 1024)
            sample = flat[::stride][:1024].double().cpu()
            x = flat.double()
            stats = torch.stack([x.sum(), (x * x).sum()]).cpu() if flat.numel() else torch.zeros(2, dtype=torch.float64)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(stats.numpy().tobytes())
            h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def write_manifest(out: Path, manifest: dict) -> None:
    tmp = Path(out) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, Path(out) / MANIFEST)


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"teacher cache {folder}: no {MANIFEST} (not a cache, or its writing did not finish); "
                                "write one with python -m data_tools.cache_teacher")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheMismatchError(f"teacher cache {folder}: {MANIFEST} is not valid JSON: {e}") from None
    if m.get("format") != FORMAT or m.get("version") not in VERSIONS:
        raise CacheMismatchError(f"teacher cache {folder}: {MANIFEST} has format {m.get('format')!r} version "
                                 f"{m.get('version')!r}; this taid-vlm reads {FORMAT!r} versions {VERSIONS}")
    if m.get("kind", "topk") not in KINDS:
        raise CacheMismatchError(f"teacher cache {folder}: {MANIFEST} field kind is {m.get('kind')!r}, not one of {KINDS}")
    if not m.get("complete"):
        raise CacheMismatchError(f"teacher cache {folder}: the manifest says the cache is incomplete")
    if rendering_hash(m["rendering"]) != m.get("rendering_hash"):
        raise CacheMismatchError(f"teacher cache {folder}: manifest field rendering_hash does not match its "
                                 "rendering settings (edited or corrupt manifest)")
    return m


def check_manifest(m: dict, folder, *, vocab: str, vocab_size: int, max_length: int, text_only: bool,
                   caption_instruction: str, teacher_model: Optional[dict] = None) -> None:
    """Raise CacheMismatchError naming the first field where the cache and this run disagree."""
    def fail(field: str, cached, key: str, now, hint: str = "rebuild the cache or change the run") -> None:
        raise CacheMismatchError(f"teacher cache {folder}: manifest field {field} is {cached!r} but this run has "
                                 f"{key} = {now!r}; {hint}")

    if m["tokenizer"]["vocab_hash"] != vocab:
        fail("tokenizer.vocab_hash", m["tokenizer"]["vocab_hash"], "the student tokenizer's vocab_hash", vocab,
             "the cache was written with another tokenizer vocabulary")
    if int(m["vocab_size"]) != int(vocab_size):
        fail("vocab_size", m["vocab_size"], "len(student tokenizer)", vocab_size)
    r = m["rendering"]
    if r["max_length"] != max_length:
        fail("rendering.max_length", r["max_length"], "data.max_length", max_length)
    if r["text_only"] != text_only:
        fail("rendering.text_only", r["text_only"], "data.text_only", text_only)
    if r["caption_instruction"] != caption_instruction:
        fail("rendering.caption_instruction", r["caption_instruction"], "data.caption_instruction", caption_instruction)
    if teacher_model is not None:
        cached = m["teacher"]["config"]
        if json.loads(json.dumps(teacher_model, default=str)) != cached:
            fail("teacher.config", "<the cached teacher's model config>", "teacher.model", "<a different config>",
                 "drop teacher.model to train from the cache alone, or rebuild the cache with this teacher")


def totals(shards: Iterable[dict]) -> Dict[str, Any]:
    shards = list(shards)
    keys = ("samples", "cached", "supervised_tokens", "bytes", "payload_bytes")
    out: Dict[str, Any] = {k: sum(int(s[k]) for s in shards) for k in keys}
    skipped: Dict[str, int] = {}
    for s in shards:
        for reason, n in s.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
    out["skipped"] = skipped
    tok = max(out["supervised_tokens"], 1)
    out["bytes_per_supervised_token"] = out["bytes"] / tok
    out["payload_bytes_per_supervised_token"] = out["payload_bytes"] / tok
    return out
