"""Read every sample of some shards through the training pipeline's own decoding and rendering, and report.

  python -m data_tools.check_shards 'data/shard-{000000..000009}.tar' [--tokenizer DIR ...] [--max-length N] [--json]
  python -m data_tools.check_shards --config configs/tiny_vlm.yaml [SHARDS ...] [--max-length N] [key=value ...]

Reports shards, samples (good ones), images, formats, and bad samples by reason with example keys
(decode and validation: taid_vlm.data.samples, as the loader does). With tokenizers it also renders
every good sample as training would (taid_vlm.data.render: chat template, assistant-only labels,
image tokens, cut at ``--max-length``) and counts, per model, the text tokens, the supervised tokens,
the longest sample, the samples that would be truncated and those the loader would drop (no
supervised token left within max_length: ``too_long``; teacher and student share none: ``unaligned``).
Tokenizers come from ``--tokenizer DIR`` (a local folder; twice: the student's, then the teacher's;
one image counts ``--image-tokens`` tokens) or from ``--config`` (a training config: its student and
teacher InputSpecs, built on the meta device, so no weights are loaded or allocated, and its data
settings; with no SHARDS its ``data.train`` and ``data.val``). img2dataset's ``*_stats.json`` beside the
shards are read and its download/resize failures reported beside ours.

``--json`` prints one JSON object: ``{"shards", "samples", "images", "bad", "bad_by_reason",
"bad_examples", "formats"}``; with tokenizers also ``"max_length", "models": {name: {"text_tokens",
"supervised_tokens", "max_tokens", "truncated", "too_long"}}`` (tokens counted after the cut),
``"would_drop", "dropped_by_reason", "would_truncate"`` (kept samples that are cut), ``"usable"``, and
the first model's ``text_tokens``, ``supervised_tokens``, ``max_text_tokens``; ``"img2dataset"`` when
stats files exist. Exit status 1 with ``--strict`` when any
sample is bad or would be dropped, or no sample is usable; 2 with ``error: ...`` for a user error
(missing path, bad flag, bad config); ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from taid_vlm.data.formats import DEFAULT_CAPTION_INSTRUCTION
from taid_vlm.data.shard_io import read_shard
from taid_vlm.data.samples import decode_sample
from taid_vlm.data.shards import expand_shards
from taid_vlm.data.skips import TOO_LONG, UNALIGNED, SampleError, SkipCounter
from taid_vlm.errors import UserError, run_cli

DEFAULT_MAX_LENGTH = 10**9  # no cut: only counting


# -- the models' input specs ---------------------------------------------------------------------------
def tokenizer_spec(tokenizer, image_tokens: int = 1):
    """An InputSpec for a bare tokenizer: each image is ``image_tokens`` tokens, its pixels are not
    computed (a 1x1 stand-in), and the image token is added when the tokenizer lacks it."""
    import torch

    from taid_vlm.spec import InputSpec

    image_token = getattr(tokenizer, "image_token", None) or "<image>"
    if tokenizer.encode(image_token, add_special_tokens=False) != [tokenizer.convert_tokens_to_ids(image_token)]:
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return InputSpec(tokenizer, image_transform=lambda img: torch.zeros(3, 1, 1), tokens_per_image=image_tokens,
                     image_token=image_token, image_token_id=tokenizer.convert_tokens_to_ids(image_token))


def _build_on_meta(model_cfg: dict, role: str):
    import torch

    from taid_vlm.models import build_model, load_model

    def build():
        if set(model_cfg) == {"saved"}:
            return load_model(model_cfg["saved"], role=role)
        return build_model(model_cfg, role=role, where=f"{role}.model")

    try:
        with torch.device("meta"):  # only the InputSpec is needed: no weights allocated or read
            return build()
    except (NotImplementedError, RuntimeError):  # a loader that cannot fill meta tensors: build for real
        return build()


def specs_from_config(cfg) -> List[Tuple[str, Any]]:
    """``[("student", spec), ("teacher", spec)]`` of a training config (no teacher for SFT or a cache)."""
    specs = [("student", _build_on_meta(cfg.student.model, "student").input_spec)]
    if cfg.loss.name != "ce" and cfg.teacher.cache is None and cfg.teacher.model is not None:
        specs.append(("teacher", _build_on_meta(cfg.teacher.model, "teacher").input_spec))
    return specs


def config_shards(cfg) -> List[str]:
    """``data.train`` and ``data.val`` of a config (a spec, a comma-separated string or a list), resolved
    as the trainer resolves them."""
    out: List[str] = []
    for spec in (cfg.data.train, cfg.data.val):
        if spec is None:
            continue
        if isinstance(spec, str) and "," in spec and "{" not in spec:
            spec = [x.strip() for x in spec.split(",")]
        out += [cfg.resolve_path(x) for x in (spec if isinstance(spec, list) else [spec])]
    return out


# -- img2dataset's own accounting -----------------------------------------------------------------------
def img2dataset_stats(shards: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Sum of the ``<shard>_stats.json`` files img2dataset writes beside its ``<shard>.tar``; None if none."""
    total: Dict[str, Any] = {"stats_files": 0, "count": 0, "successes": 0, "failed_to_download": 0,
                             "failed_to_resize": 0, "status": Counter()}
    for s in shards:
        p = Path(s)
        stats = p.with_name(p.name[: -len(".tar")] + "_stats.json") if p.name.endswith(".tar") else None
        if stats is None or not stats.is_file():
            continue
        try:
            d = json.loads(stats.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"unreadable img2dataset stats file: {e}", str(stats)) from None
        total["stats_files"] += 1
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            total[k] += int(d.get(k, 0) or 0)
        total["status"].update({str(k): int(v) for k, v in (d.get("status_dict") or {}).items()})
    if not total["stats_files"]:
        return None
    total["status"] = dict(total["status"].most_common())
    return total


# -- the check ---------------------------------------------------------------------------------------
def _render_all(sample, renderers, per_model, dropped: SkipCounter) -> Tuple[bool, bool]:
    """Render for every model as the loader does; return (would_drop, truncated)."""
    from taid_vlm.data.align import align_labels

    rendered, drop, truncated = [], False, False
    for name, r in renderers:
        m = per_model[name]
        try:
            out = r(sample)
        except SampleError as e:
            m[e.reason if e.reason == TOO_LONG else "other_render_errors"] += 1
            if not drop:
                dropped.add(e.reason, sample.key)
            drop = True
            continue
        rendered.append(out)
        m["text_tokens"] += len(out.input_ids)
        m["supervised_tokens"] += out.n_supervised
        m["max_tokens"] = max(m["max_tokens"], len(out.input_ids))
        m["truncated"] += int(out.truncated)
        truncated |= out.truncated
    if not drop and len(rendered) == 2:  # the loader pairs teacher and student supervised tokens
        sl, _, n_dropped = align_labels(rendered[0].labels, rendered[1].labels)
        if n_dropped and not any(x != -100 for x in sl[1:]):
            dropped.add(UNALIGNED, sample.key)
            drop = True
    return drop, truncated


def check(spec, tokenizer=None, text_only: bool = False, caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION,
          max_length: Optional[int] = None, specs: Optional[List[Tuple[str, Any]]] = None,
          image_tokens: int = 1) -> Dict[str, Any]:
    """The report of the module docstring. ``specs``: ``[(name, InputSpec)]``; ``tokenizer``: one bare
    tokenizer instead (named ``model``)."""
    from taid_vlm.data.render import Renderer

    shards = expand_shards(spec)
    if specs is None and tokenizer is not None:
        specs = [("model", tokenizer_spec(tokenizer, image_tokens))]
    limit = int(max_length) if max_length is not None else DEFAULT_MAX_LENGTH
    renderers = [(name, Renderer(s, limit)) for name, s in specs or []]
    per_model = {name: Counter(text_tokens=0, supervised_tokens=0, max_tokens=0, truncated=0, too_long=0)
                 for name, _ in renderers}
    skips, dropped, formats = SkipCounter(), SkipCounter(), Counter()
    samples = images = would_truncate = 0
    for path in shards:
        for raw in read_shard(path, skips):
            try:
                s = decode_sample(raw, caption_instruction, text_only)
            except SampleError as e:
                skips.add(e.reason, raw.get("__key__"))
                continue
            samples += 1
            images += len(s.images)
            formats[s.format] += 1
            if renderers:
                drop, cut = _render_all(s, renderers, per_model, dropped)
                would_truncate += int(cut and not drop)
    out: Dict[str, Any] = {"shards": len(shards), "samples": samples, "images": images, "bad": skips.total,
                           "bad_by_reason": skips.as_dict(), "bad_examples": skips.examples,
                           "formats": dict(formats)}
    if renderers:
        first = per_model[renderers[0][0]]
        out.update(max_length=max_length, models={k: dict(v) for k, v in per_model.items()},
                   would_drop=dropped.total, dropped_by_reason=dropped.as_dict(), dropped_examples=dropped.examples,
                   would_truncate=would_truncate, usable=samples - dropped.total,
                   text_tokens=first["text_tokens"], supervised_tokens=first["supervised_tokens"],
                   max_text_tokens=first["max_tokens"])
    stats = img2dataset_stats(shards)
    if stats is not None:
        out["img2dataset"] = stats
    return out


def print_report(out: Dict[str, Any]) -> None:
    print(f"{out['shards']} shards, {out['samples']} good samples, {out['images']} images, {out['bad']} bad")
    print(f"formats: {out['formats']}")
    for r, n in out["bad_by_reason"].items():
        print(f"  bad {r}: {n}  e.g. {', '.join(out['bad_examples'].get(r, []))}")
    for name, m in out.get("models", {}).items():
        print(f"{name}: text tokens {m['text_tokens']} (supervised {m['supervised_tokens']}, longest kept "
              f"{m['max_tokens']}); at max_length {out['max_length']}: {m['truncated']} truncated, "
              f"{m['too_long']} too long")
    if "would_drop" in out:
        print(f"the loader would use {out['usable']} samples, drop {out['would_drop']} "
              f"{out['dropped_by_reason'] or ''} and truncate {out['would_truncate']}")
    i2d = out.get("img2dataset")
    if i2d:
        print(f"img2dataset ({i2d['stats_files']} stats files): {i2d['count']} urls, {i2d['successes']} successes, "
              f"{i2d['failed_to_download']} failed to download, {i2d['failed_to_resize']} failed to resize; "
              f"here: {out['samples'] + out['bad']} samples read, {out['samples']} good")
        for status, n in list(i2d["status"].items())[:5]:
            print(f"  img2dataset status {status!r}: {n}")
        if i2d["successes"] != out["samples"] + out["bad"]:
            print(f"  note: img2dataset reports {i2d['successes']} successes but the shards hold "
                  f"{out['samples'] + out['bad']} samples")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.check_shards", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("pattern", nargs="*", help="shard spec(s): brace pattern, folder, glob, list "
                                               "(with --config also key=value overrides)")
    ap.add_argument("--config", help="a training config: tokenizers, image tokens, max_length and shards from it")
    ap.add_argument("--tokenizer", action="append", help="local tokenizer folder; twice: the student's, then the teacher's")
    ap.add_argument("--image-tokens", type=int, default=1, help="tokens one image occupies with --tokenizer (default 1)")
    ap.add_argument("--max-length", type=int, help="count samples cut or dropped at this length (default: the "
                                                   "config's data.max_length, else no cut)")
    ap.add_argument("--text-only", action="store_true", help="read as text-only data (LLM path)")
    ap.add_argument("--caption-instruction", default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--strict", action="store_true",
                    help="exit with status 1 when any sample is bad or would be dropped, or none is usable")
    return ap


def _main(argv: List[str]) -> int:
    a = build_parser().parse_args(argv)
    if a.max_length is not None and a.max_length < 2:
        raise UserError(f"must be >= 2, got {a.max_length}", "--max-length")
    if a.image_tokens < 1:
        raise UserError(f"must be >= 1, got {a.image_tokens}", "--image-tokens")
    if a.config and a.tokenizer:
        raise UserError("give --config or --tokenizer, not both", "--tokenizer")
    patterns = list(a.pattern)
    specs, max_length, text_only = None, a.max_length, a.text_only
    instruction = a.caption_instruction
    if a.config:
        from taid_vlm.config import load_config

        overrides = [p for p in patterns if "=" in p and not Path(p).exists()]
        patterns = [p for p in patterns if p not in overrides]
        cfg = load_config(a.config, overrides)
        specs = specs_from_config(cfg)
        max_length = max_length if max_length is not None else cfg.data.max_length
        text_only = text_only or bool(cfg.data.text_only)
        instruction = instruction or cfg.data.caption_instruction
        if not patterns:
            patterns = config_shards(cfg)
    elif a.tokenizer:
        if len(a.tokenizer) > 2:
            raise UserError("at most two tokenizers (teacher and student)", "--tokenizer")
        from transformers import AutoTokenizer

        specs = []
        for i, folder in enumerate(a.tokenizer):
            if not Path(folder).is_dir():
                raise UserError("no such tokenizer folder", f"--tokenizer {folder}")
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            specs.append(("model" if len(a.tokenizer) == 1 else ("student", "teacher")[i], tokenizer_spec(tok, a.image_tokens)))
    if not patterns:
        raise UserError("no shards given", "SHARDS")
    try:
        expand_shards(patterns)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e), "SHARDS") from None
    out = check(patterns, None, text_only, instruction or DEFAULT_CAPTION_INSTRUCTION, max_length, specs)
    if a.json:
        print(json.dumps(out))
    else:
        print_report(out)
    usable = out.get("usable", out["samples"])
    if a.strict and (out["bad"] or out.get("would_drop") or usable == 0):
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status (2 and one ``error:`` line for a user error)."""
    from taid_vlm.config import ConfigError

    return run_cli(_main, argv, user_errors=(ConfigError,))


if __name__ == "__main__":
    sys.exit(main())
