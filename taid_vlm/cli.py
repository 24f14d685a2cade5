"""`taid-vlm` command line: train, export, demo (the end-to-end CPU demo), compare (losses side by side),
eval (harnesses on an exported student)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from taid_vlm.train.command import add_train_command, root_parser, run_parsed


def _export(args) -> int:
    from taid_vlm.train.export import export_student

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    export_student(args.checkpoint, args.out_dir, overwrite=args.overwrite)  # ExportError is a UserError
    return 0


def _demo(args) -> int:
    from taid_vlm.experiments.demo import DemoPlan, run_demo
    from taid_vlm.experiments.runs import sigterm_as_interrupt

    sigterm_as_interrupt()

    run_demo(args.out, DemoPlan.quick() if args.quick else DemoPlan(), fresh=args.fresh)
    return 0


def _compare(args) -> int:
    from taid_vlm.experiments.compare import CompareError, parse_losses, run_cli
    from taid_vlm.experiments.runs import sigterm_as_interrupt

    sigterm_as_interrupt()

    try:
        losses = parse_losses(args.losses) if args.losses is not None else None
        return run_cli(args.config, losses, args.seeds, args.steps, args.out, list(args.overrides), args.fresh)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seeds(text: str) -> list:
    from taid_vlm.experiments.compare import CompareError, parse_seeds

    try:
        return parse_seeds(text)
    except CompareError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--seeds: ")) from None


def build_parser() -> argparse.ArgumentParser:
    ap, sub = root_parser("taid-vlm")
    add_train_command(sub)
    e = sub.add_parser("export", help="write the student of a checkpoint as a Hugging Face model folder")
    e.add_argument("checkpoint", help="a step folder, a checkpoints/ folder or a run's output dir (latest)")
    e.add_argument("out_dir", help="a new or empty folder (written beside it, then renamed into place)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (never merged into it)")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of user errors too")
    e.set_defaults(func=_export)

    d = sub.add_parser("demo", help="end to end on a CPU in minutes: teacher VLM, TAID and SFT students, report",
                       description="Synthetic shards -> a teacher VLM trained from scratch -> a several-times-smaller "
                                   "student distilled with TAID, and the same student with SFT -> OUT/report.md + plots.")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="tiny sizes, seconds: a smoke test of the pipeline")
    d.add_argument("--fresh", action="store_true", help="retrain every step (default: reuse finished identical runs)")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of user errors too")
    d.set_defaults(func=_demo)

    c = sub.add_parser("compare", help="run several losses on the same setup and seeds; one table + plot",
                       description="Every loss runs on the same data, teacher, student initialisation, steps and "
                                   "seeds; final held-out metrics as mean +- std over seeds. CONFIG is a training "
                                   "config (e.g. configs/demo/distill.yaml, configs/tiny_text.yaml) or a study config "
                                   "(configs/demo/capacity_gap.yaml: one student, teachers of growing size).")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every run")
    c.add_argument("--losses", help="comma-separated loss names or methods: LOSS+MODE (e.g. taid+on_policy), gkd, "
                                    "distillm (default: taid,fkl,rkl,sfkl, or the study's list)")
    c.add_argument("--seeds", type=_seeds, help="a count N: seeds 0..N-1 (default: 1, or the study's); or the seeds themselves, "
                                   "comma-separated: 7,8 (one seed: 7,). Finished runs in --out are reused")
    c.add_argument("--steps", type=_positive_int, help="optimizer steps per run (default: the config's)")
    c.add_argument("--out", help="output folder (default: runs/compare/CONFIG_NAME)")
    c.add_argument("--fresh", action="store_true", help="retrain every run (default: reuse finished identical runs)")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of user errors too")
    c.set_defaults(func=_compare)
    _add_eval_parser(sub)
    return ap


def _eval(args) -> int:
    from taid_vlm.experiments.harness import run_cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(args)


def _add_eval_parser(sub) -> None:
    v = sub.add_parser("eval", help="evaluate an exported student: lm-evaluation-harness (text) or held-out "
                                    "answer exact match (VLM)",
                       description="A text student (causal LM folder) runs lm-evaluation-harness tasks through its "
                                   "hf model class; a VLM student (image-text-to-text folder) is scored by greedy-answer "
                                   "exact match on held-out shards. --run appends the scores to a run's metrics.jsonl.")
    v.add_argument("export_dir", help="a folder written by taid-vlm export")
    v.add_argument("--tasks", help="comma-separated lm-eval (text) or lmms-eval (--lmms-model) task names")
    v.add_argument("--include-path", help="a folder of local task YAMLs (e.g. tests/data/lm_eval_tasks)")
    v.add_argument("--val", help="held-out shards: pattern, folder or glob (VLM student)")
    v.add_argument("--lmms-model", help="VLM student: lmms-eval's model class for its family (qwen2_vl, llava_hf, ...)")
    v.add_argument("--lmms-model-args", help="more lmms-eval model_args, e.g. max_pixels=3136,min_pixels=784")
    v.add_argument("--limit", type=_positive_int, help="documents per task (text) / batches (VLM); default: all")
    v.add_argument("--batch-size", type=_positive_int, default=8)
    v.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    v.add_argument("--chat-template", action="store_true", help="lm-eval: render prompts with the model's chat template")
    v.add_argument("--run", help="a run folder: append the scores to its metrics.jsonl at its last step")
    v.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of user errors too")
    v.set_defaults(func=_eval)


def main(argv: Optional[list] = None) -> int:
    return run_parsed(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
