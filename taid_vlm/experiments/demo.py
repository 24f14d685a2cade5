"""`taid-vlm demo [--out DIR]`: the whole method on a CPU in minutes, with no download.

  1. data     synthetic colored-shape shards (taid_vlm.data.synthetic): train, and a held-out split of
              conversations only (`val_answers`: every supervised token is part of an answer)
  2. teacher  a VLM trained from scratch with cross-entropy (configs/demo/teacher.yaml), then exported
  3. TAID     a several-times-smaller student distilled from it (configs/demo/distill.yaml)
  4. SFT      the same student, same initialisation, data order and steps, trained on the labels only
  5. report   OUT/report.md, OUT/summary.json, OUT/*.png; a table on the terminal

Every training step runs through `taid-vlm train` in a subprocess (OUT/<run>/train.log holds its log,
OUT/<run>/metrics.jsonl its metrics). `--quick` shrinks everything to seconds (smoke test).
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from .answers import answer_exact_match, exact_match_rows
from .report import markdown_table, plot_runs, text_table
from .runs import Metrics, TrainJob, count_parameters, run_export, run_training
from .t_plot import plot_taid_t, schedule_floor

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"


@dataclass
class DemoPlan:
    n_samples: int = 8000        # synthetic samples, train + val
    val_fraction: float = 0.1
    data_seed: int = 0
    teacher_steps: int = 1000
    student_steps: int = 400
    teacher_eval_every: int = 200
    student_eval_every: int = 50
    micro_batch_size: int = 16

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(n_samples=120, val_fraction=0.25, teacher_steps=4, student_steps=3, teacher_eval_every=2,
                   student_eval_every=1, micro_batch_size=4)


def keep_conversations(src_dir: Path, dst_dir: Path) -> int:
    """Copy the samples of src_dir/*.tar that are conversations (a `json` member) into dst_dir; drop
    captions. Returns the number of samples kept."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    kept = 0
    for i, shard in enumerate(sorted(Path(src_dir).glob("*.tar"))):
        with tarfile.open(shard) as src:
            groups: dict[str, list[tarfile.TarInfo]] = {}
            for m in src.getmembers():
                if m.isfile():
                    groups.setdefault(m.name.split(".", 1)[0], []).append(m)
            tmp = dst_dir / f".shard-{i:06d}.tar.tmp"
            with tarfile.open(tmp, "w") as dst:
                for members in groups.values():
                    if any(m.name.endswith(".json") for m in members):
                        kept += 1
                        for m in members:
                            dst.addfile(m, src.extractfile(m))
            os.replace(tmp, dst_dir / f"shard-{i:06d}.tar")
    return kept


def make_data(out: Path, plan: DemoPlan, echo: Callable[[str], None]) -> dict:
    from taid_vlm.data.synthetic import synth

    manifest = out / "manifest.json"
    want = {"n": plan.n_samples, "seed": plan.data_seed, "val_fraction": plan.val_fraction}
    if manifest.is_file() and (out / "val_answers").is_dir():
        have = json.loads(manifest.read_text())
        if all(have.get(k) == v for k, v in want.items() if k != "val_fraction") and have.get("val_fraction") == plan.val_fraction:
            echo(f"[data] reusing {out}")
            return have
    rep = synth(out, plan.n_samples, seed=plan.data_seed, size=64, val_fraction=plan.val_fraction)
    rep["val_answers"] = keep_conversations(out / "val", out / "val_answers")
    rep["val_fraction"] = plan.val_fraction
    manifest.write_text(json.dumps(rep, indent=1))
    echo(f"[data] {rep['train']['written']} train samples (captions, Q/A, two-image questions), "
         f"{rep['val_answers']} held-out conversations -> {out}")
    return rep


def heldout_metrics(student_dir: Path, teacher_dir: Path, val: Path) -> dict:
    """The trainer's own evaluation (taid_vlm.train.evaluate) of a saved student against a saved teacher."""
    import torch

    from taid_vlm.data import build_loader
    from taid_vlm.models import load_model
    from taid_vlm.train.evaluate import evaluate
    from taid_vlm.train.teacher import Teacher

    student = load_model(student_dir, role="teacher")
    teacher_model = load_model(teacher_dir, role="teacher")
    teacher = Teacher(teacher_model, "replicated", torch.device("cpu"), torch.float32)
    batches = build_loader(str(val), student.input_spec, teacher_model.input_spec, mode="eval", batch_size=16,
                           max_length=256, num_workers=0)
    return evaluate(student, teacher, batches, torch.device("cpu"), len(student.tokenizer))


def _quiet_libraries() -> None:
    """No per-file loading bars or accelerator warnings in the middle of the demo's output."""
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


class _Stages:
    """Numbered stage banners on the terminal, and the seconds each stage took."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo, self.start, self.seconds = echo, time.time(), {}

    @contextlib.contextmanager
    def __call__(self, name: str, title: str):
        self.echo(f"\n=== [{len(self.seconds) + 1}/5] {title}  ({(time.time() - self.start) / 60:.1f} min elapsed) ===")
        self.seconds[name] = time.time()
        yield
        self.seconds[name] = time.time() - self.seconds[name]


def run_demo(out: Path, plan: Optional[DemoPlan] = None, fresh: bool = False,
             echo: Callable[[str], None] = print) -> dict:
    plan = plan or DemoPlan()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stage = _Stages(echo)
    data = out / "data"
    with stage("data", "synthetic image-text shards"):
        make_data(data, plan, echo)
    common = [f"data.train={data / 'train'}", f"data.val={data / 'val_answers'}",
              f"train.micro_batch_size={plan.micro_batch_size}"]
    with stage("teacher", f"teacher VLM: {plan.teacher_steps} steps of cross-entropy from scratch"):
        teacher_job = TrainJob("teacher", CONFIGS / "teacher.yaml", out / "teacher" / "run", plan.teacher_steps,
                               [*common, f"train.eval_every={plan.teacher_eval_every}"])
        teacher_metrics = run_training(teacher_job, fresh=fresh, echo=echo)
        teacher_dir = run_export(out / "teacher" / "run", out / "teacher" / "model", fresh=fresh, echo=echo)
    # Both students are evaluated against the teacher during training (SFT's teacher is for evaluation only).
    student_common = [*common, f"teacher.model={{saved: {teacher_dir}}}", f"train.eval_every={plan.student_eval_every}",
                      "train.eval_at_start=true"]
    with stage("taid", f"student distilled with TAID: {plan.student_steps} steps"):
        taid_metrics = run_training(TrainJob("TAID student", CONFIGS / "distill.yaml", out / "student_taid",
                                             plan.student_steps, student_common), fresh=fresh, echo=echo)
    with stage("sft", f"same student with SFT (cross-entropy on the labels): {plan.student_steps} steps"):
        sft_metrics = run_training(TrainJob("SFT student", CONFIGS / "distill.yaml", out / "student_sft",
                                            plan.student_steps, [*student_common, "loss.name=ce", "loss.params={}"]),
                                   fresh=fresh, echo=echo)
    with stage("report", "held-out evaluation and report"):
        measured = evaluate_models(out, data / "val_answers", teacher_dir, fresh, echo)
    total = time.time() - stage.start
    summary = {"plan": asdict(plan), "out": str(out), "seconds": total, "stage_seconds": stage.seconds, **measured,
               "teacher_final": teacher_metrics.final_eval}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=lambda x: None))
    report = write_report(out, summary, {"teacher": teacher_metrics, "TAID student": taid_metrics,
                                          "SFT student": sft_metrics})
    echo("\n" + report["terminal"])
    echo(f"\nreport: {out / 'report.md'}   plots: {', '.join(p.name for p in report['plots'])}")
    echo(f"demo finished in {total / 60:.1f} min")
    return summary


def evaluate_models(out: Path, val: Path, teacher_dir: Path, fresh: bool, echo: Callable[[str], None]) -> dict:
    """Export both students; measure parameters, held-out metrics against the teacher (the teacher's own
    row too: itself as the student, so its KL and agreement are measured, not assumed) and exact match."""
    _quiet_libraries()
    models = {"teacher": teacher_dir}
    for key, run in (("taid", "student_taid"), ("sft", "student_sft")):
        models[key] = run_export(out / run, out / run / "model", fresh=fresh, echo=echo)
    return {
        "params": {k: count_parameters(v) for k, v in models.items()},
        "final": {k: heldout_metrics(models[k], teacher_dir, val) for k in ("taid", "sft")},
        "teacher_heldout": heldout_metrics(teacher_dir, teacher_dir, val),
        "exact_match": {k: answer_exact_match(models[k], str(val)) for k in ("teacher", "taid", "sft")},
    }


def results_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    p, f, e = summary["params"], summary["final"], summary["exact_match"]
    header = ["model", "parameters", "held-out KL(T‖S) ↓", "top-1 agreement ↑", "CE ↓", "answer-token acc ↑",
              "answer exact match ↑"]
    rows = []
    for key, name, r in (("teacher", "teacher (CE from scratch)", summary["teacher_heldout"]),
                         ("taid", "student, TAID", f["taid"]), ("sft", "student, SFT", f["sft"])):
        rows.append([name, f"{p[key]['total'] / 1e6:.2f} M", f"{r['eval_kl']:.4f}", f"{r['eval_top1_agreement']:.3f}",
                     f"{r['eval_student_ce']:.4f}", f"{r['eval_student_acc']:.3f}", f"{e[key]['exact_match']:.3f}"])
    return header, rows


def write_report(out: Path, summary: dict, runs: dict[str, Metrics]) -> dict:
    header, rows = results_rows(summary)
    students = {k: v for k, v in runs.items() if k != "teacher"}
    t_acc = summary["final"]["taid"].get("eval_teacher_acc")
    plots = [p for p in (
        plot_runs(runs, "loss", out / "loss.png", title="training loss (teacher & SFT: CE; TAID: KL(p_t ‖ q_S))",
                  ylabel="loss per supervised token", logy=True),
        plot_taid_t(runs["TAID student"], schedule_floor(out / "student_taid"), out / "taid_t.png"),
        plot_runs(runs, "eval_student_acc", out / "heldout_accuracy.png", source="eval",
                  title="held-out answer-token accuracy", ylabel="accuracy (argmax == answer token)",
                  hlines={"teacher (final)": t_acc}),
        plot_runs(students, "eval_kl", out / "heldout_kl.png", source="eval",
                  title="held-out KL(teacher ‖ student) per answer token", ylabel="KL (log scale)", logy=True),
    ) if p is not None]
    ek, eh = exact_match_rows(summary["exact_match"], ["teacher", "taid", "sft"])
    plan = summary["plan"]
    secs = summary["stage_seconds"]
    md = [
        "# taid-vlm demo report", "",
        f"Synthetic colored shapes, {plan['n_samples']} samples; teacher trained {plan['teacher_steps']} steps with "
        f"cross-entropy; each student {plan['student_steps']} steps from the same initialisation, same data order "
        f"(micro-batch {plan['micro_batch_size']}). Held-out set: {summary['exact_match']['teacher']['answers']} "
        "answers of conversations never trained on.", "",
        markdown_table(header, rows),
        "- KL(T‖S), top-1 agreement, CE and answer-token accuracy: per supervised token of the held-out "
        "answers (the answer words and their end-of-turn token), as the trainer's eval computes them.",
        "- Answer exact match: the answer is right at every token under teacher forcing, i.e. greedy "
        "decoding reproduces it verbatim. By kind of question:", "",
        markdown_table(ek, eh),
        "## Plots", "",
        *[f"![{p.stem}]({p.name})\n" for p in plots],
        "## Time", "",
        markdown_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in secs.items()] +
                       [["total", f"{summary['seconds']:.0f}"]]),
        "Runs: `teacher/run`, `student_taid`, `student_sft` (each: `metrics.jsonl`, `train.log`, `config.yaml`); "
        "exported models: `teacher/model`, `student_taid/model`, `student_sft/model` "
        "(`taid_vlm.models.load_model(DIR)`); all numbers: `summary.json`.", "",
    ]
    (out / "report.md").write_text("\n".join(md))
    terminal = text_table(header, rows) + "\n\nanswer exact match by question kind:\n" + text_table(ek, eh)
    return {"terminal": terminal, "plots": plots}
