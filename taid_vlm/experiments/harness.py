"""`taid-vlm eval EXPORT ...`: evaluation harnesses on an exported student.

- A text student (a transformers causal LM folder): EleutherAI's lm-evaluation-harness, through its
  own `hf` model class, on any task it knows or on local task YAMLs (`--include-path DIR`).
- A VLM student (a transformers image-text-to-text folder): greedy-answer exact match on held-out
  shards (`--val SHARDS`, experiments/answers.py: the exact-match score of greedy generation), built
  as the `hf_vlm` model of this project from the exported folder itself.

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
    scores = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric = key.split(",")[0]  # "acc,none": the metric and its filter
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                scores[f"eval_harness/{task}/{metric}"] = float(value)
    return scores


def answer_scores(export_dir: Path, val: str, batch_size: int = 8, max_batches: int = 0) -> dict[str, float]:
    """Greedy-answer exact match of the exported VLM on held-out shards (loaded from the folder as `hf_vlm`)."""
    from taid_vlm.models import build_model

    from .answers import answer_exact_match

    model = build_model({"type": "hf_vlm", "path": str(export_dir), "tokenizer": {"path": str(export_dir)}},
                        role="teacher", where="eval")
    result = answer_exact_match(model, val, batch_size=batch_size, max_batches=max_batches)
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


def run_cli(export_dir: str, tasks: Optional[str], include_path: Optional[str], val: Optional[str],
            limit: Optional[int], batch_size: int, device: str, run: Optional[str], chat_template: bool) -> int:
    export = Path(export_dir)
    kind = export_kind(export)
    if kind == TEXT:
        if not tasks:
            raise HarnessError(f"--tasks: required for a text student ({export})")
        scores = lm_eval_scores(export, [t.strip() for t in tasks.split(",") if t.strip()],
                                Path(include_path) if include_path else None, limit, batch_size, device, chat_template)
    else:
        if not val:
            raise HarnessError(f"--val: held-out shards required for a VLM student ({export})")
        scores = answer_scores(export, val, batch_size, max_batches=limit or 0)
    for key, value in sorted(scores.items()):
        print(f"{key}\t{value:.6g}")
    if run:
        step = record_in_run(Path(run), scores, export)
        print(f"appended to {Path(run) / 'metrics.jsonl'} at step {step}")
    return 0
