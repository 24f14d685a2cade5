"""Read every sample of some shards through the training pipeline's decoding and report.

  python -m data_tools.check_shards 'data/shard-{000000..000009}.tar' [--tokenizer DIR] [--text-only] [--json]

Reports shards, samples (good ones), images, formats, bad samples by reason with example keys, and
with ``--tokenizer`` the text tokens (rendered with the tokenizer's chat template, images counted as
one token each) and the supervised (assistant) tokens among them. ``--json`` prints one JSON object:
``{"shards", "samples", "images", "bad", "bad_by_reason", "bad_examples", "formats", "text_tokens",
"supervised_tokens", "max_text_tokens"}``. Exit status 1 with ``--strict`` when any sample is bad.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any, Dict, List, Optional

from taid_vlm.data.formats import DEFAULT_CAPTION_INSTRUCTION
from taid_vlm.data.pipeline import read_shard
from taid_vlm.data.samples import decode_sample
from taid_vlm.data.shards import expand_shards
from taid_vlm.data.skips import SampleError, SkipCounter


def check(spec, tokenizer=None, text_only: bool = False,
          caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION) -> Dict[str, Any]:
    shards = expand_shards(spec)
    renderer = None
    if tokenizer is not None:
        from taid_vlm.data.render import Renderer
        from taid_vlm.spec import InputSpec

        # one token per image: the count is about text; no transform is run
        image_token = getattr(tokenizer, "image_token", None) or "<image>"
        renderer = Renderer(InputSpec(tokenizer, image_transform=None, tokens_per_image=0,
                                      image_token=image_token,
                                      image_token_id=tokenizer.convert_tokens_to_ids(image_token)), 10**9)
    skips, formats = SkipCounter(), Counter()
    samples = images = text_tokens = supervised = max_tokens = 0
    for path in shards:
        for raw in read_shard(path, skips):
            try:
                s = decode_sample(raw, caption_instruction, text_only)
                if renderer is not None:
                    ids, labels = renderer._chat(s) if s.messages is not None else renderer._text(s)
                    text_tokens += len(ids)
                    supervised += sum(1 for x in labels[1:] if x != -100)
                    max_tokens = max(max_tokens, len(ids))
            except SampleError as e:
                skips.add(e.reason, raw.get("__key__"))
                continue
            samples += 1
            images += len(s.images)
            formats[s.format] += 1
    out = {"shards": len(shards), "samples": samples, "images": images, "bad": skips.total,
           "bad_by_reason": skips.as_dict(), "bad_examples": skips.examples, "formats": dict(formats)}
    if renderer is not None:
        out.update(text_tokens=text_tokens, supervised_tokens=supervised, max_text_tokens=max_tokens)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.check_shards", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("pattern", nargs="+", help="shard spec(s): brace pattern, folder, glob, list")
    ap.add_argument("--tokenizer", help="local tokenizer folder, to count text tokens")
    ap.add_argument("--text-only", action="store_true", help="read as text-only data (LLM path)")
    ap.add_argument("--caption-instruction", default=DEFAULT_CAPTION_INSTRUCTION)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when any sample is bad")
    a = ap.parse_args(argv)
    tok = None
    if a.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.tokenizer, local_files_only=True)
    try:
        out = check(a.pattern, tok, a.text_only, a.caption_instruction)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{out['shards']} shards, {out['samples']} good samples, {out['images']} images, {out['bad']} bad")
        print(f"formats: {out['formats']}")
        if "text_tokens" in out:
            print(f"text tokens: {out['text_tokens']} (supervised {out['supervised_tokens']}, "
                  f"longest sample {out['max_text_tokens']})")
        for r, n in out["bad_by_reason"].items():
            print(f"  bad {r}: {n}  e.g. {', '.join(out['bad_examples'].get(r, []))}")
    return 1 if a.strict and out["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
