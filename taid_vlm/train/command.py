"""The `train` command, shared by both entry points: `taid-vlm train CONFIG` (taid_vlm/cli.py) and the launcher's
`deepspeed --module taid_vlm.train CONFIG` (train/__main__.py, which must not import the cli above it): its
arguments, the run config they give, and the one voice every command ends with."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from taid_vlm.errors import USER_ERROR_STATUS, UserError, error_line

# The trainer (torch, DeepSpeed) is imported when a command runs, not to parse one: `--help` stays instant.


def train_command(args) -> int:
    from taid_vlm.train.resume_config import run_config
    from taid_vlm.train.trainer import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.total_steps={args.max_steps}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    if args.resume:
        overrides.append("train.resume=true")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    # command-line paths resolve against the working directory; --resume: the run's saved config + these overrides
    cfg = run_config(args.config, overrides)
    train(cfg)
    return 0


def root_parser(prog: str):
    """The top parser (its --debug) and its subcommands."""
    ap = argparse.ArgumentParser(prog=prog, description="Distil vision-language and language models with TAID.")
    ap.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    return ap, ap.add_subparsers(dest="command", required=True)


def add_train_command(sub) -> None:
    t = sub.add_parser("train", help="run a distillation from a YAML config",
                       description="One process: taid-vlm train CONFIG. Many: deepspeed --num_gpus N --module taid_vlm.train CONFIG")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    t.add_argument("--output-dir")
    t.add_argument("--max-steps", type=int, help="train.total_steps")
    t.add_argument("--save-every", type=int, help="train.save_every")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    t.add_argument("--overwrite", action="store_true",
                   help="start fresh in a folder of another run: deletes its checkpoints/, metrics.jsonl, config.yaml, "
                        "tensorboard/ and trackers.json (nothing else: new tracker runs start)")
    t.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of user errors too")
    t.set_defaults(func=train_command)


def run_parsed(parser: argparse.ArgumentParser, argv: Optional[list]) -> int:
    """Parse ``argv`` (key.sub=value overrides may stand anywhere after a command's config) and run the command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
    from taid_vlm.train.launch_env import quiet_library_notices

    quiet_library_notices()
    return run_command(args)


def run_command(args) -> int:
    """One voice: user errors `error: <what> (<where>)` and exit 2; a stopped run its message and 128 + signal;
    a diverged run its message and 1; tracebacks only for bugs (or with --debug)."""
    try:
        return args.func(args)
    except UserError as e:  # ConfigError, run folder, resume mismatch, missing checkpoint, disk full
        if args.debug:
            raise
        print(error_line(e), file=sys.stderr)
        return USER_ERROR_STATUS
    except KeyboardInterrupt:  # before training started (or demo/compare): nothing to save
        if args.debug:
            raise
        print("taid-vlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        stopped = _run_end(e)
        if stopped is None or args.debug:
            raise
        message, code = stopped
        print(message, file=sys.stderr)
        return code


def _run_end(e: BaseException):
    """A run that ended on purpose: a signal (saved; resume later) or the divergence guard (neither can
    have been raised when its module was never loaded)."""
    signals, guard = sys.modules.get("taid_vlm.train.signals"), sys.modules.get("taid_vlm.train.guard")
    if signals is not None and isinstance(e, signals.TrainingStopped):
        return f"taid-vlm: {e}", e.exit_code
    if guard is not None and isinstance(e, guard.DivergenceError):
        return f"error: {e}", 1
    return None
