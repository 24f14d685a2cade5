"""The pictures say what the reports say (issue 24, item 7): one colour per method in every plot, KL on
log axes, and the TAID t plot titled by what t did. Drawn from small synthetic metrics, no training."""

from __future__ import annotations

import math

import pytest
import yaml
from matplotlib.colors import to_hex, to_rgba

from taid_vlm.experiments.colours import METHOD_COLOURS, MODE_DARKENING, method_colour
from taid_vlm.experiments.compare import draw_capacity_gap
from taid_vlm.experiments.methods import PROTOCOLS, SAMPLED_MODES
from taid_vlm.experiments.report import aggregate, draw_compare, draw_runs, plot_compare
from taid_vlm.experiments.runs import Metrics
from taid_vlm.experiments.t_plot import draw_taid_t, plot_taid_t, schedule_floor, t_title
from taid_vlm.losses import LOSS_NAMES
from taid_vlm.losses.schedule import TAIDSchedule

STEPS = 400


def _schedule_run(alpha: float, final_kl: float, loss_decay: float = 0.99) -> Metrics:
    """A TAID run's records: t from the real schedule fed a falling loss; eval KL from 6 down to final_kl."""
    schedule = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=alpha, beta=0.99)
    m = Metrics()
    for step in range(1, STEPS + 1):
        loss = 2.5 * loss_decay ** step
        schedule.update(loss, step, STEPS)
        m.train[step] = {"step": step, "loss": loss, "t": round(schedule.t, 4)}
    for step in range(0, STEPS + 1, 50):
        kl = 6.0 * (final_kl / 6.0) ** (step / STEPS)
        m.evals[step] = {"step": step, "eval_kl": kl, "eval_student_acc": 0.9 * step / STEPS}
    return m


def _plain_run(final_kl: float) -> Metrics:
    m = _schedule_run(0.0, final_kl)
    for rec in m.train.values():
        del rec["t"]
    return m


def _floor(step: int) -> float:
    return TAIDSchedule(t_start=0.4, t_end=1.0).linear(step, STEPS)


def _line_colours(ax) -> dict[str, str]:
    return {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_every_method_and_the_teacher_has_its_own_colour():
    assert set(LOSS_NAMES) | set(PROTOCOLS) | {"teacher"} == set(METHOD_COLOURS)
    assert set(MODE_DARKENING) == set(SAMPLED_MODES)
    sampled = [f"{loss}+{mode}" for loss in LOSS_NAMES for mode in SAMPLED_MODES]
    hexes = [to_hex(c) for c in METHOD_COLOURS.values()]
    assert len(set(hexes)) == len(hexes)
    assert len({method_colour(m) for m in sampled} | set(hexes)) == len(sampled) + len(hexes)
    assert method_colour("taid+on_policy") == "#663306"  # TAID's orange (#ff7f0e) at 40 %
    assert method_colour("TAID student") == method_colour("taid") == "tab:orange"
    assert method_colour("SFT student") == method_colour("ce") == method_colour("sft")
    assert method_colour("my_new_loss") == method_colour("my_new_loss")  # unlisted: still one stable colour
    assert to_hex(method_colour("my_new_loss")) not in hexes


def test_same_method_same_colour_in_every_figure():
    taid, sft, fkl = _schedule_run(5e-4, 0.032), _plain_run(0.045), _plain_run(0.060)
    demo = {"teacher": _plain_run(0.01), "TAID student": taid, "SFT student": sft}
    loss_ax = draw_runs(demo, "loss", logy=True).axes[0]
    kl_ax = draw_runs({"TAID student": taid, "SFT student": sft}, "eval_kl", source="eval", logy=True).axes[0]
    acc_ax = draw_runs(demo, "eval_student_acc", source="eval", hlines={"teacher (final)": 0.9}).axes[0]
    curves = {"taid": [taid, taid], "ce": [sft], "fkl": [fkl]}
    cmp_axes = draw_compare(aggregate({k: [r.final_eval for r in v] for k, v in curves.items()}), curves).axes
    t_ax = draw_taid_t(taid, _floor).axes[0]
    want = {name: to_hex(to_rgba(method_colour(name))) for name in ("taid", "ce", "fkl", "teacher")}
    for ax in (loss_ax, kl_ax, acc_ax):
        got = _line_colours(ax)
        assert got["TAID student"] == want["taid"] and got["SFT student"] == want["ce"]
    assert _line_colours(loss_ax)["teacher"] == want["teacher"]
    assert _line_colours(cmp_axes[0]) == {m: want[m] for m in ("taid", "ce", "fkl")}
    kl_points = [to_hex(c.lines[0].get_color()) for c in cmp_axes[1].containers]
    assert kl_points == [want["taid"], want["ce"], want["fkl"]]
    for bars_ax in cmp_axes[2:]:
        assert [to_hex(p.get_facecolor()) for p in bars_ax.patches] == [want["taid"], want["ce"], want["fkl"]]
    assert _line_colours(t_ax)["t (TAID student)"] == want["taid"]
    assert want["taid"] != want["ce"] != want["fkl"]


def test_kl_axes_are_logarithmic_and_show_the_final_gap():
    taid, sft = _schedule_run(5e-4, 0.032), _plain_run(0.045)
    kl_ax = draw_runs({"TAID student": taid, "SFT student": sft}, "eval_kl", source="eval", logy=True).axes[0]
    assert kl_ax.get_yscale() == "log"
    lo, hi = kl_ax.get_ylim()
    assert lo < 0.032 and hi > 6.0
    # on a log axis the final 0.032 vs 0.045 gap is a visible share of the height (on 0-6 linear: 0.2 %)
    assert (math.log(0.045) - math.log(0.032)) / (math.log(hi) - math.log(lo)) > 0.05
    curves = {"taid": [taid], "ce": [sft]}
    agg = aggregate({k: [r.final_eval for r in v] for k, v in curves.items()})
    axes = draw_compare(agg, curves).axes
    assert [ax.get_yscale() for ax in axes] == ["log", "log", "linear"]  # KL curves, final KL, accuracy
    assert axes[1].get_ylim()[0] < 0.032 < 0.045 < axes[1].get_ylim()[1]
    acc_ax = draw_runs({"TAID student": taid}, "eval_student_acc", source="eval").axes[0]
    assert acc_ax.get_yscale() == "linear"
    per_teacher = {name: {"params": p, "teacher_eval": {"eval_student_acc": 0.9}, "agg": agg} for name, p in
                   (("small", 1e6), ("large", 4e6))}
    gap = draw_capacity_gap(per_teacher, ["taid", "ce"])
    assert [ax.get_yscale() for ax in gap.axes] == ["log", "linear"]
    gap_colours = {c.get_label(): to_hex(c.lines[0].get_color()) for c in gap.axes[0].containers}
    assert gap_colours == {"taid": to_hex(method_colour("taid")), "ce": to_hex(method_colour("ce"))}


def test_t_title_says_the_paper_default_stayed_on_its_floor():
    steps, ts = _schedule_run(5e-4, 0.032).series("t")
    assert t_title(steps, ts, _floor) == "TAID t: 0.40 -> 1.00 over 400 steps, on its linear floor"


def test_t_title_says_how_far_the_adaptive_term_lifted_t():
    run = _schedule_run(0.02, 0.032)
    steps, ts = run.series("t")
    lifts = [t - _floor(s) for s, t in zip(steps, ts)]
    best = max(lifts)
    assert best > 0.05  # a large alpha with a steadily falling loss does lift t
    title = t_title(steps, ts, _floor)
    assert title == (f"TAID t: 0.40 -> 1.00 over 400 steps, lifted up to {best:.3f} above its linear floor "
                     f"(step {steps[lifts.index(best)]})")
    assert draw_taid_t(run, _floor).axes[0].get_title() == title


def test_schedule_floor_comes_from_the_runs_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = {"loss": {"name": "taid", "params": {"t_start": 0.2, "t_end": 0.8}}, "train": {"total_steps": 100}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    floor = schedule_floor(run)
    assert [floor(0), floor(50), floor(100), floor(200)] == pytest.approx([0.2, 0.5, 0.8, 0.8])
    config["loss"] = {"name": "taid", "params": {}}  # the loss's own defaults: t_start 0.4, t_end 1.0
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert schedule_floor(run)(50) == pytest.approx(0.7)
    config["loss"] = {"name": "fkl", "params": {}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert schedule_floor(run) is None


def test_pngs_are_written(tmp_path):
    taid, sft = _schedule_run(0.02, 0.032), _plain_run(0.045)
    assert plot_taid_t(taid, _floor, tmp_path / "t.png").stat().st_size > 10_000
    assert plot_taid_t(sft, _floor, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    curves = {"taid": [taid], "ce": [sft]}
    agg = aggregate({k: [r.final_eval for r in v] for k, v in curves.items()})
    assert plot_compare(agg, curves, tmp_path / "cmp.png", title="t").stat().st_size > 10_000
