"""`taid-vlm` command line: train, export (demo and compare arrive with their issues)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional


def _train(args) -> int:
    from taid_vlm.config import load_config
    from taid_vlm.train import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.total_steps={args.max_steps}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    if args.resume:
        overrides.append("train.resume=true")
    cfg = load_config(args.config, overrides)
    if args.output_dir:  # a command-line output dir is relative to the caller, not to the config file
        cfg.output_dir = os.path.abspath(args.output_dir)
    train(cfg)
    return 0


def _export(args) -> int:
    from taid_vlm.train.export import export_student

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    export_student(args.checkpoint, args.out_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="taid-vlm", description="Distil vision-language and language models with TAID.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a distillation from a YAML config",
                       description="One process: taid-vlm train CONFIG. Many: deepspeed --num_gpus N --module taid_vlm.train CONFIG")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    t.add_argument("--output-dir")
    t.add_argument("--max-steps", type=int, help="train.total_steps")
    t.add_argument("--save-every", type=int, help="train.save_every")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    t.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="write the student of a checkpoint as a Hugging Face model folder")
    e.add_argument("checkpoint", help="a step folder, a checkpoints/ folder or a run's output dir (latest)")
    e.add_argument("out_dir")
    e.set_defaults(func=_export)
    return ap


def main(argv: Optional[list] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    # Overrides (key.sub=value) may stand anywhere after the config, between options too.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if args.command == "train":
        args.overrides = list(args.overrides) + extra
    from taid_vlm.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"taid-vlm: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
