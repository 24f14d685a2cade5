"""Cache a teacher's top-k log-probs (or its final hidden states) beside the shards, once, so
distillation runs without the teacher.

    python -m data_tools.cache_teacher CONFIG --k 64 --out DIR [--split train|val|both] [key.sub=value ...]
    python -m data_tools.cache_teacher CONFIG --format hidden --out DIR   # exact for every loss
    deepspeed --num_gpus 8 --module data_tools.cache_teacher CONFIG --k 64 --out DIR   # many processes

CONFIG is the training config: its teacher (model, placement, dtype), its data (shards, max_length,
text_only, caption_instruction) and its train.precision decide what is cached. DIR receives one
companion shard per data shard (``DIR/train/shard-000000.tar`` ...: the same ``__key__``s and file
names) and ``DIR/manifest.json`` (teacher, tokenizer, k, rendering settings, per-shard statistics).
Then train with ``teacher.cache=DIR``: no teacher model is built. Formats: ``--format topk`` (default;
6k + 8 bytes per supervised token; ``--tail`` picks how the mass outside the top-k is spread) or
``--format hidden`` (the teacher's final hidden state per token, 2H or 4H bytes, plus its lm_head once:
exact for every loss when stored in the teacher's dtype). Which to pick, with measured errors:
taid_vlm/teacher_cache/__init__.py and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional


def _main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.cache_teacher", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    ap.add_argument("--format", choices=("topk", "hidden"), default="topk",
                    help="topk: top-k log-probs + tail mass; hidden: final hidden states + lm_head (exact)")
    ap.add_argument("--k", type=int, default=64, help="top-k entries per supervised token (default 64)")
    ap.add_argument("--tail", choices=("uniform", "student"), default="uniform",
                    help="top-k: spread the tail mass uniformly or like the student's own tail (default uniform)")
    ap.add_argument("--hidden-dtype", choices=("bfloat16", "float16", "float32", "int8"),
                    help="hidden: storage dtype (default: the teacher's dtype, which makes the cache exact; "
                         "int8: one scale per token, half of bf16, < 1 %% gradient error measured)")
    ap.add_argument("--out", required=True, help="cache folder")
    ap.add_argument("--split", choices=("train", "val", "both"), default="both")
    ap.add_argument("--batch-size", type=int, help="samples per teacher forward (default: train.micro_batch_size)")
    ap.add_argument("--logprob-dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--compress", choices=("stream", "records", "none"), default="stream",
                    help="stream: gzip each companion tar whole (smallest; read whole by each data-loader worker); "
                         "records: gzip each record in a plain tar (read by byte range: for shuffle blocks spanning "
                         "many shards); none: plain tar (default: stream)")
    ap.add_argument("--no-compress", action="store_true", help="the same as --compress none")
    ap.add_argument("--overwrite", action="store_true", help="rewrite companion shards that are already finished")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    a = ap.parse_intermixed_args(argv)  # overrides may follow options

    from taid_vlm.train.launch_env import quiet_library_notices

    quiet_library_notices()  # before DeepSpeed is imported
    from taid_vlm.config import load_config
    from taid_vlm.teacher_cache_writer import write_cache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(a.config, list(a.overrides))
    splits = ("train", "val") if a.split == "both" else (a.split,)
    manifest = write_cache(cfg, a.out, k=a.k, splits=splits, batch_size=a.batch_size, logprob_dtype=a.logprob_dtype,
                           overwrite=a.overwrite, compress="none" if a.no_compress else a.compress, kind=a.format,
                           hidden_dtype=a.hidden_dtype, tail=a.tail)
    if manifest is not None:
        t = manifest["totals"]
        print(json.dumps({"out": a.out, "format": manifest["kind"], "k": manifest["k"],
                          "vocab_size": manifest["vocab_size"], **t}))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; a config error or a missing path is one ``error:`` line and exit status 2."""
    from taid_vlm.config import ConfigError
    from taid_vlm.errors import run_cli

    return run_cli(_main, argv, user_errors=(ConfigError,))


if __name__ == "__main__":
    sys.exit(main())
