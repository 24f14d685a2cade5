"""`taid-vlm eval EXPORT ...`: evaluation harnesses on an exported student.

- A text student (a transformers causal LM folder): EleutherAI's lm-evaluation-harness, through its
  own `hf` model class, on any task it knows or on local task YAMLs (`--include-path DIR`).
- A VLM student (a transformers image-text-to-text folder): greedy-answer exact match on held-out
  shards (`--val SHARDS`, experiments/answers.py: the exact-match score of greedy generation), built
  as the `hf_vlm` model of this project from the exported folder itself; and, where lmms-eval is
  importable (it is not in the lock: docs/evaluation.md says why and how), lmms-eval's own model
  class for the family (`--lmms-model qwen2_vl`) on its tasks or local ones (`--include-path`).

With `--run RUN_DIR` the scores are appended to that run's metrics.jsonl as an evaluation record at
the run's last step (keys `eval_harness/TASK/METRIC`, `eval_answer_exact_match`), where `taid-vlm
compare` and the report read final evaluations.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

from taid_vlm.errors import UserError

TEXT, VLM = "text", "vlm"


class HarnessError(UserError, ValueError):
    """A bad `taid-vlm eval` request; one line naming the folder, task or option."""


def export_kind(export_dir: Path) -> str:
    """text (causal LM) or vlm (image-text-to-text), from the exported folder's config.json."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if not (Path(export_dir) / "config.json").is_file():
        raise HarnessError(f"not an exported Hugging Face model folder (no config.json): {export_dir}")
    model_type = AutoConfig.from_pretrained(str(export_dir)).model_type
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return VLM
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return TEXT
    raise HarnessError(f"{export_dir}: model_type {model_type!r} is neither a causal LM nor an image-text-to-text model")


def lm_eval_scores(export_dir: Path, tasks: Sequence[str], include_path: Optional[Path] = None,
                   limit: Optional[int] = None, batch_size: int = 8, device: str = "cpu",
                   chat_template: bool = False) -> dict[str, float]:
    """lm-evaluation-harness on the exported causal LM: {"eval_harness/TASK/METRIC": value} (stderr included)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"--tasks: unknown lm-eval task {unknown[0]!r}"
                           + ("" if include_path else " (a local task needs --include-path DIR)"))
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(export_dir), "dtype": "float32" if device == "cpu" else "auto"},
        tasks=list(tasks), task_manager=manager, limit=limit, batch_size=batch_size, device=device,
        apply_chat_template=chat_template, log_samples=False)
    return _numbers(results["results"], "eval_harness")


def lmms_eval_scores(export_dir: Path, model: str, tasks: Sequence[str], include_path: Optional[Path] = None,
                     limit: Optional[int] = None, batch_size: int = 1, device: str = "cpu",
                     model_args: str = "") -> dict[str, float]:
    """lmms-eval's model class for the student's family (`model`, e.g. qwen2_vl, llava_hf) on the exported
    VLM: {"eval_lmms/TASK/METRIC": value}. lmms-eval is not in this project's lock (see docs/evaluation.md)."""
    try:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager
    except ImportError as e:
        raise HarnessError(f"--lmms-model: lmms-eval is not importable ({e}); see docs/evaluation.md") from None
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"--tasks: unknown lmms-eval task {unknown[0]!r}")
    args = f"pretrained={export_dir},device_map={device}" + (f",{model_args}" if model_args else "")
    results = simple_evaluate(model=model, model_args=args, tasks=list(tasks), task_manager=manager, limit=limit,
                              batch_size=batch_size, device=device)
    return _numbers(results["results"], "eval_lmms")


def _numbers(results: dict, prefix: str) -> dict[str, float]:
    """`{"task": {"acc,none": 0.5, "alias": ...}}` -> `{"PREFIX/task/acc": 0.5}` (finite numbers only)."""
    scores = {}
    for task, values in results.items():
        for key, value in values.items():
            metric = key.split(",")[0]  # "acc,none": the metric and its filter
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
                scores[f"{prefix}/{task}/{metric}"] = float(value)
    return scores


def answer_scores(export_dir: Path, val: str, batch_size: int = 8, max_batches: int = 0) -> dict[str, float]:
    """Greedy-answer exact match of the exported VLM on held-out shards (loaded from the folder as `hf_vlm`)."""
    from taid_vlm.models import build_model

    from .answers import answer_exact_match

    model = build_model({"type": "hf_vlm", "path": str(export_dir), "tokenizer": {"path": str(export_dir)}},
                        role="teacher", where="eval")
    try:
        result = answer_exact_match(model, val, batch_size=batch_size, max_batches=max_batches)
    except FileNotFoundError as e:
        raise HarnessError(f"--val: {e}") from None
    scores = {"eval_answer_exact_match": result["exact_match"], "eval_answers": float(result["answers"])}
    for kind, (correct, total) in result["by_kind"].items():
        scores[f"eval_answer_exact_match/{kind}"] = correct / total
    return scores


def record_in_run(run_dir: Path, scores: dict[str, float], export_dir: Path) -> int:
    """Append the scores to RUN_DIR/metrics.jsonl as an evaluation at the run's last step; returns that step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise HarnessError(f"--run: no metrics.jsonl in {run_dir}")
    steps = [json.loads(line).get("step") for line in path.read_text().splitlines() if line.strip()]
    step = max((s for s in steps if isinstance(s, int)), default=0)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **scores, "harness_export": str(export_dir), "time": time.time()}) + "\n")
    return step


def run_cli(args) -> int:
    """`taid-vlm eval` (cli.py's arguments): score, print, and append to --run's metrics.jsonl."""
    export = Path(args.export_dir)
    include = Path(args.include_path) if args.include_path else None
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if export_kind(export) == TEXT:
        if not tasks:
            raise HarnessError(f"--tasks: required for a text student ({export})")
        scores = lm_eval_scores(export, tasks, include, args.limit, args.batch_size, args.device, args.chat_template)
    else:
        if not args.val and not args.lmms_model:
            raise HarnessError(f"--val (held-out shards) or --lmms-model with --tasks: required for a VLM student ({export})")
        scores = answer_scores(export, args.val, args.batch_size, max_batches=args.limit or 0) if args.val else {}
        if args.lmms_model:
            if not tasks:
                raise HarnessError(f"--tasks: required with --lmms-model ({export})")
            scores.update(lmms_eval_scores(export, args.lmms_model, tasks, include, args.limit, 1, args.device,
                                           args.lmms_model_args or ""))
    for key, value in sorted(scores.items()):
        print(f"{key}\t{value:.6g}")
    if args.run:
        step = record_in_run(Path(args.run), scores, export)
        print(f"appended to {Path(args.run) / 'metrics.jsonl'} at step {step}")
    return 0
