"""The experiments' pure parts: aggregation over seeds, tables, plots, answer grouping, metrics reading."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from taid_vlm.experiments.answers import answer_kind, exact_match_rows, turns_of
from taid_vlm.experiments.compare import margins, verdict
from taid_vlm.experiments.report import (aggregate, compare_rows, markdown_table, plot_compare, plot_runs, stat,
                                         with_derived)
from taid_vlm.experiments.runs import Metrics, progress_line


def test_stat_mean_and_sample_std():
    s = stat([1.0, 2.0, 3.0])
    assert s.mean == pytest.approx(2.0) and s.std == pytest.approx(1.0) and s.n == 3
    assert stat([5.0]).std == 0.0 and stat([5.0]).fmt() == "5.0000"
    assert stat([]).n == 0 and stat([]).fmt() == "–"
    assert stat([1.0, float("nan"), None]).n == 1  # non-finite values (a diverged run) are left out


def test_aggregate_adds_perplexity_and_groups_by_method():
    runs = {"taid": [{"eval_kl": 0.1, "eval_student_ce": 1.0}, {"eval_kl": 0.3, "eval_student_ce": 1.0}],
            "fkl": [{"eval_kl": 0.5, "eval_student_ce": 2.0}]}
    agg = aggregate(runs, ["eval_kl", "student_ppl"])
    assert agg["taid"]["eval_kl"].mean == pytest.approx(0.2)
    assert agg["taid"]["eval_kl"].std == pytest.approx(math.sqrt(0.02))
    assert agg["taid"]["student_ppl"].mean == pytest.approx(math.e)
    assert agg["fkl"]["eval_kl"].n == 1
    assert with_derived({"eval_student_ce": 0.0})["student_ppl"] == 1.0
    assert margins(agg) == {"fkl": pytest.approx(0.3)}
    (line,) = verdict(agg)
    assert "TAID vs fkl" in line and "lower by 0.3000" in line


def test_compare_rows_bold_best_and_markdown():
    agg = aggregate({"taid": [{"eval_kl": 0.1, "eval_student_acc": 0.5}], "rkl": [{"eval_kl": 0.2, "eval_student_acc": 0.7}]})
    header, rows = compare_rows(agg)
    assert header[:2] == ["method", "seeds"] and "held-out KL(T‖S) ↓" in header
    kl, acc = header.index("held-out KL(T‖S) ↓"), header.index("answer-token accuracy ↑")
    assert rows[0][kl] == "**0.1000**" and rows[1][kl] == "0.2000"
    assert rows[1][acc] == "**0.7000**"
    assert "top-1 agreement ↑" not in header  # no run reported it
    md = markdown_table(header, rows)
    assert md.splitlines()[1].count("---") == len(header) and "| taid | 1 |" in md


def _write_metrics(run_dir, n_steps=5, with_t=True):
    run_dir.mkdir(parents=True)
    lines = []
    for s in range(1, n_steps + 1):
        rec = {"step": s, "loss": 1.0 / s, "time": 100.0 + s}
        if with_t:
            rec["t"] = 0.4 + 0.1 * s
        lines.append(rec)
        if s % 2 == 0:
            lines.append({"step": s, "eval_kl": 0.5 / s, "eval_student_acc": 0.1 * s, "eval_tokens": 10})
    lines.append({"event": "end", "step": n_steps})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 9, \"lo")
    return run_dir


def test_metrics_read_series_and_progress(tmp_path):
    m = Metrics.read(_write_metrics(tmp_path / "a"))  # the half-written last line is ignored
    assert m.finished and sorted(m.train) == [1, 2, 3, 4, 5] and sorted(m.evals) == [2, 4]
    assert m.series("eval_kl", "eval") == ([2, 4], [0.25, 0.125])
    assert m.final_eval == {"eval_kl": 0.125, "eval_student_acc": pytest.approx(0.4), "eval_tokens": 10}
    line = progress_line("x", m, 10, 3.0)
    assert line.startswith("[x] step 5/10 loss 0.2000 t 0.900") and "left" in line


def test_plots_are_real_pngs(tmp_path):
    runs = {"a": Metrics.read(_write_metrics(tmp_path / "a")), "b": Metrics.read(_write_metrics(tmp_path / "b", with_t=False))}
    p1 = plot_runs(runs, "loss", tmp_path / "loss.png", logy=True)
    p2 = plot_runs(runs, "eval_student_acc", tmp_path / "acc.png", source="eval", hlines={"teacher": 0.9})
    assert plot_runs(runs, "missing", tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    agg = aggregate({k: [v.final_eval] for k, v in runs.items()})
    p3 = plot_compare(agg, {k: [v] for k, v in runs.items()}, tmp_path / "cmp.png", title="t")
    for p in (p1, p2, p3):
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"


def test_answer_turns_and_kinds():
    assert turns_of([-100, 5, 6, -100, -100, 7, -100, 8]) == [[1, 2], [5], [7]]
    assert turns_of([-100, -100]) == []
    assert [answer_kind(x) for x in ("red", "Circle", "three", "At the top left.", "The second.", "hello")] == \
        ["color", "shape", "count", "position", "which image", "other"]
    header, rows = exact_match_rows({"m": {"exact_match": 0.5, "answers": 4, "by_kind": {"color": (1, 2), "count": (1, 2)}}})
    assert header == ["model", "answers", "exact match", "color", "count"] and rows[0][3] == "0.500 (2)"
