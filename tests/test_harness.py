"""`taid-vlm eval` on exported students: lm-evaluation-harness on a text student with the local task
shipped in tests/data/lm_eval_tasks (no download), held-out answer exact match on a VLM student, and
the scores in the run's metrics.jsonl and the compare table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from taid_vlm.experiments.harness import answer_scores, export_kind, lm_eval_scores, record_in_run
from taid_vlm.experiments.report import COMPARE_METRICS, aggregate, compare_rows, harness_metrics
from taid_vlm.experiments.runs import Metrics
from taid_vlm.models import build_model
from taid_vlm.train.export import write_student
from tests.models_helpers import load_cfg

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
CHOICES = ["one", "two", "three"]


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("text_export") / "student"
    write_student(build_model(load_cfg("tiny_text_student"), "student", "student.model"), out)
    return out


def our_choice_scores(export: Path) -> tuple[float, float]:
    """acc and acc_norm of the shapes_count task computed with transformers alone: the log-likelihood of
    " " + choice after the prompt (argmax, and argmax of it per byte of the choice)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    tok = AutoTokenizer.from_pretrained(str(export))
    docs = [json.loads(line) for line in (TASKS / "shapes_count.jsonl").read_text().splitlines()]
    right = right_norm = 0
    for doc in docs:
        context = f"{doc['scene']}\n{doc['question']}"
        scores = []
        for choice in CHOICES:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0]
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        right += int(max(range(3), key=lambda i: scores[i]) == doc["gold"])
        right_norm += int(max(range(3), key=lambda i: scores[i] / len(" " + CHOICES[i])) == doc["gold"])
    return right / len(docs), right_norm / len(docs)


def test_lm_eval_harness_scores_the_exported_text_student_on_the_shipped_task(text_export):
    assert export_kind(text_export) == "text"
    scores = lm_eval_scores(text_export, ["shapes_count"], TASKS, batch_size=4)
    acc, acc_norm = our_choice_scores(text_export)
    assert scores["eval_harness/shapes_count/acc"] == pytest.approx(acc, abs=1e-9)
    assert scores["eval_harness/shapes_count/acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    assert scores["eval_harness/shapes_count/sample_len"] == 24
    assert 0 < scores["eval_harness/shapes_count/acc_stderr"] < 0.2


def test_an_unknown_task_or_folder_is_one_line_naming_it(text_export, tmp_path):
    from taid_vlm.experiments.harness import HarnessError

    with pytest.raises(HarnessError, match=r"^--tasks: unknown lm-eval task 'shapes_count' \(a local task needs "
                                           r"--include-path DIR\)$"):
        lm_eval_scores(text_export, ["shapes_count"])
    with pytest.raises(HarnessError, match=rf"^not an exported Hugging Face model folder \(no config.json\): {tmp_path}$"):
        export_kind(tmp_path)


def test_scores_land_in_the_run_metrics_beside_its_final_eval_and_in_the_compare_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 4, "loss": 2.0}, {"step": 4, "eval_kl": 0.5, "eval_student_ce": 1.5}, {"event": "end", "step": 4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    scores = {"eval_harness/shapes_count/acc": 0.625, "eval_harness/shapes_count/acc_stderr": 0.1}
    assert record_in_run(run, scores, tmp_path / "export") == 4
    final = Metrics.read(run).final_eval
    assert final["eval_kl"] == 0.5 and final["eval_harness/shapes_count/acc"] == 0.625
    columns = harness_metrics(final)
    assert columns == (("eval_harness/shapes_count/acc", "harness/shapes_count/acc ↑", False),)
    header, rows = compare_rows(aggregate({"taid": [final]}), COMPARE_METRICS + columns)
    assert header[-1] == "harness/shapes_count/acc ↑" and rows[0][-1].startswith("0.6250")


def test_vlm_export_scores_greedy_answer_exact_match_on_held_out_shards(tmp_path):
    from taid_vlm.data.synthetic import synth
    from taid_vlm.experiments.answers import answer_exact_match
    from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer
    from tests.hf_family_helpers import model_cfg

    build_family_tokenizer("qwen2_vl", save_dir=tmp_path / "tok")
    torch.manual_seed(0)
    student = build_model(model_cfg("qwen2_vl", tmp_path / "tok"), "student", "student.model")
    write_student(student, tmp_path / "export")
    synth(tmp_path / "data", 12, seed=5, val_fraction=0.0, size=56)
    assert export_kind(tmp_path / "export") == "vlm"
    scores = answer_scores(tmp_path / "export", str(tmp_path / "data" / "train"), batch_size=4)
    ours = answer_exact_match(student, str(tmp_path / "data" / "train"), batch_size=4)
    assert scores["eval_answers"] == ours["answers"] > 12
    assert scores["eval_answer_exact_match"] == pytest.approx(ours["exact_match"], abs=1e-12)


def write_lmms_task(folder: Path, n: int = 6) -> None:
    """A local lmms-eval task (no download): synthetic-shapes images and questions, exact-match scoring."""
    import io
    import random

    from PIL import Image

    from taid_vlm.data.synthetic import draw, qa_turns, random_scene

    rng, docs = random.Random(7), []
    for i in range(n):
        scene = random_scene(rng)
        Image.open(io.BytesIO(draw(scene, 56, rng))).save(folder / f"img{i}.png")
        question, answer = qa_turns(scene, rng)[0]
        docs.append({"image": str(folder / f"img{i}.png"), "question": question, "answer": answer})
    (folder / "shapes_vqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "shapes_vqa.yaml").write_text(
        f"task: shapes_vqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'shapes_vqa.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_visual: !function shapes_vqa_utils.doc_to_visual\n"
        "doc_to_text: !function shapes_vqa_utils.doc_to_text\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 8\n  do_sample: false\n"
        "process_results: !function shapes_vqa_utils.process_results\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "shapes_vqa_utils.py").write_text(
        "from PIL import Image\n\n\ndef doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n\n\n"
        "def doc_to_text(doc):\n    return doc['question']\n\n\ndef process_results(doc, results):\n"
        "    return {'exact_match': float(results[0].strip().lower() == doc['answer'].strip().lower())}\n")


def test_vlm_export_runs_in_lmms_evals_model_class_for_its_family(tmp_path):
    """Runs where lmms-eval is importable (not from the lock: docs/evaluation.md); skipped elsewhere."""
    pytest.importorskip("lmms_eval.models.simple.qwen2_vl")
    from taid_vlm.experiments.harness import lmms_eval_scores
    from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer
    from tests.hf_family_helpers import model_cfg

    build_family_tokenizer("qwen2_vl", save_dir=tmp_path / "tok")
    torch.manual_seed(0)
    write_student(build_model(model_cfg("qwen2_vl", tmp_path / "tok"), "student", "student.model"), tmp_path / "export")
    (tmp_path / "tasks").mkdir()
    write_lmms_task(tmp_path / "tasks")
    scores = lmms_eval_scores(tmp_path / "export", "qwen2_vl", ["shapes_vqa"], tmp_path / "tasks",
                              model_args="max_pixels=3136,min_pixels=784")
    assert 0.0 <= scores["eval_lmms/shapes_vqa/exact_match"] <= 1.0
    assert set(scores) >= {"eval_lmms/shapes_vqa/exact_match", "eval_lmms/shapes_vqa/exact_match_stderr"}
