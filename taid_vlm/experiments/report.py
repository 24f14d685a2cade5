"""Markdown tables, aggregation over seeds and PNG plots (matplotlib, Agg backend: no display needed).

    aggregate({"taid": [final_eval_seed0, ...], "fkl": [...]})  -> {loss: {metric: Stat}}
    markdown_table(header, rows)                               -> str
    plot_runs({"TAID student": Metrics, ...}, "eval_kl", png)  -> a curve per run (draw_runs: the figure)
    plot_compare(agg, curves, png)                            -> compare.png (draw_compare: the figure)
Every method is drawn in its colour from colours.py; KL axes are logarithmic.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .colours import method_colour
from .runs import Metrics

# (key in the per-run result, column title, lower is better?)
COMPARE_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("eval_kl", "held-out KL(T‖S) ↓", True),
    ("eval_top1_agreement", "top-1 agreement ↑", False),
    ("eval_student_ce", "student CE ↓", True),
    ("student_ppl", "student perplexity ↓", True),
    ("eval_student_acc", "answer-token accuracy ↑", False),
)


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float      # sample standard deviation (n - 1); 0 for a single value
    n: int

    def fmt(self, digits: int = 4) -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "–"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


# Scores a run has only sometimes: train.eval_generation (generation_metric.py) and `taid-vlm eval --run`.
GENERATION_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("eval_rougeL", "ROUGE-L (greedy answers) ↑", False),
    ("eval_exact_match", "exact match (greedy answers) ↑", False),
)


def harness_metrics(keys) -> tuple[tuple[str, str, bool], ...]:
    """Table columns for the optional scores the runs have: the eval loop's generation metric, and those
    `taid-vlm eval --run` added to runs (higher is better; no stderr)."""
    keys = set(keys)
    names = sorted({k for k in keys if k.startswith(("eval_harness/", "eval_answer_exact_match"))
                    and not k.endswith("_stderr") and not k.endswith("/sample_len")})
    generated = tuple(m for m in GENERATION_METRICS if m[0] in keys)
    return generated + tuple((k, f"{k[len('eval_'):]} ↑", False) for k in names)


def stat(values: Sequence[float]) -> Stat:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


def with_derived(final_eval: Mapping[str, float]) -> dict[str, float]:
    """A run's final evaluation plus student perplexity = exp(student CE per supervised token)."""
    out = dict(final_eval)
    ce = out.get("eval_student_ce")
    if isinstance(ce, (int, float)) and math.isfinite(ce):
        out["student_ppl"] = math.exp(min(ce, 700.0))
    return out


def aggregate(results: Mapping[str, Sequence[Mapping[str, float]]],
              keys: Optional[Sequence[str]] = None) -> dict[str, dict[str, Stat]]:
    """{method: [final eval of each seed]} -> {method: {metric: Stat over the seeds}}."""
    out: dict[str, dict[str, Stat]] = {}
    for method, runs in results.items():
        runs = [with_derived(r) for r in runs]
        names = list(keys) if keys is not None else sorted({k for r in runs for k in r})
        out[method] = {k: stat([r[k] for r in runs if k in r]) for k in names}
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(x) -> str:
        if isinstance(x, float):
            return "–" if not math.isfinite(x) else f"{x:.4f}"
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table aligned for a terminal."""
    cells = [[str(h) for h in header]] + [[f"{x:.4f}" if isinstance(x, float) else str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def best_methods(agg: Mapping[str, Mapping[str, Stat]], key: str, lower_is_better: bool) -> set:
    vals = {m: s[key].mean for m, s in agg.items() if key in s and s[key].n}
    if not vals:
        return set()
    best = min(vals.values()) if lower_is_better else max(vals.values())
    return {m for m, v in vals.items() if v == best}


def compare_rows(agg: Mapping[str, Mapping[str, Stat]],
                 metrics: Sequence[tuple[str, str, bool]] = COMPARE_METRICS) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table; the best mean per column in bold."""
    present = [m for m in metrics if any(m[0] in s and s[m[0]].n for s in agg.values())]
    header = ["method", "seeds"] + [title for _, title, _ in present]
    bests = {key: best_methods(agg, key, low) for key, _, low in present}
    rows = []
    for method, stats in agg.items():
        n = max((s.n for s in stats.values()), default=0)
        row = [method, str(n)]
        for key, _, _ in present:
            text = stats[key].fmt() if key in stats else "–"
            row.append(f"**{text}**" if method in bests[key] and len(agg) > 1 else text)
        rows.append(row)
    return header, rows


# ---- plots ---------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: Mapping[str, Metrics], key: str, path: Path, **style) -> Optional[Path]:
    """draw_runs, written to `path` as a PNG. None (and no file) if no run has `key`."""
    fig = draw_runs(runs, key, **style)
    return None if fig is None else _save(fig, path)


def draw_runs(runs: Mapping[str, Metrics], key: str, *, source: str = "train", title: str = "", ylabel: str = "",
              logy: bool = False, hlines: Optional[Mapping[str, float]] = None):
    """One curve per run of `key` over steps (`source`: train records or eval records), each in its
    method's colour (colours.py). Returns the figure, or None if no run has data."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    drawn = 0
    for name, metrics in runs.items():
        steps, values = metrics.series(key, source)
        if logy:  # a log axis cannot show values <= 0
            steps, values = [s for s, v in zip(steps, values) if v > 0], [v for v in values if v > 0]
        if not steps:
            continue
        ax.plot(steps, values, label=name, color=method_colour(name), marker="o" if source == "eval" else None,
                markersize=3, linewidth=1.6 if source == "eval" else 1.0)
        drawn += 1
    for label, y in (hlines or {}).items():
        if y is not None and math.isfinite(y):
            ax.axhline(y, linestyle="--", color=method_colour("teacher"), linewidth=1.0)
            ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=8,
                        color=method_colour("teacher"), va="bottom")
    if not drawn:
        plt.close(fig)
        return None
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel or key)
    ax.set_title(title or key)
    ax.grid(alpha=0.3, which="both" if logy else "major")
    ax.legend(fontsize=8)
    return fig


# (key, panel title) of the final-value panels of compare.png; KL panels use a log axis
COMPARE_PANELS = (("eval_kl", "held-out KL(T‖S) ↓"), ("eval_top1_agreement", "top-1 agreement ↑"),
                  ("eval_student_acc", "answer-token accuracy ↑"))


def plot_compare(agg: Mapping[str, Mapping[str, Stat]], curves: Mapping[str, Sequence[Metrics]], path: Path,
                 title: str = "") -> Path:
    return _save(draw_compare(agg, curves, title), path)


def draw_compare(agg: Mapping[str, Mapping[str, Stat]], curves: Mapping[str, Sequence[Metrics]], title: str = ""):
    """Left: held-out KL over steps, mean over seeds (band: min-max), log axis. Right: final value per method
    with the seed standard deviation as error bar, for each of KL (log axis), top-1 agreement and answer
    accuracy. Every method in its own colour (colours.py)."""
    plt = _plt()
    panels = [m for m in COMPARE_PANELS if any(m[0] in s and s[m[0]].n for s in agg.values())]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.2 * (1 + len(panels)), 3.8), dpi=100, squeeze=False)
    axes = axes[0]
    _kl_curves(axes[0], curves)
    for ax, (key, label) in zip(axes[1:], panels):
        _final_bars(ax, agg, key, label)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _kl_curves(ax, curves: Mapping[str, Sequence[Metrics]]) -> None:
    for method, runs in curves.items():
        by_step: dict[int, list[float]] = {}
        for m in runs:
            for s, v in zip(*m.series("eval_kl", "eval")):
                if v > 0:  # a log axis cannot show 0
                    by_step.setdefault(s, []).append(v)
        if not by_step:
            continue
        steps = sorted(by_step)
        mean = [statistics.fmean(by_step[s]) for s in steps]
        ax.plot(steps, mean, label=method, color=method_colour(method), linewidth=1.4)
        if any(len(by_step[s]) > 1 for s in steps):
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                            color=method_colour(method), alpha=0.15)
    ax.set_yscale("log")  # final KLs of 0.03 vs 0.05 after a start near 6: invisible on a linear axis
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out KL(T‖S) per token")
    ax.set_title("held-out KL over training")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _final_bars(ax, agg: Mapping[str, Mapping[str, Stat]], key: str, label: str) -> None:
    """Final value per method (error bar: seed std) in the method's colour. KL: a point on a log axis
    (a bar's height means nothing there) spanning at least a factor 3, so equal values look equal."""
    methods = list(agg)
    means = [agg[m][key].mean if key in agg[m] else float("nan") for m in methods]
    stds = [agg[m][key].std if key in agg[m] else 0.0 for m in methods]
    colours = [method_colour(m) for m in methods]
    finite = [v for v in means if math.isfinite(v)]
    if key == "eval_kl":
        for i, (mean, std, colour) in enumerate(zip(means, stds, colours)):
            ax.errorbar(i, mean, yerr=std, fmt="o", markersize=7, capsize=4, color=colour)
        ax.set_yscale("log")
        positive = [v for v in finite if v > 0]
        if positive:
            ax.set_ylim(min(positive) / 1.7, max(positive) * 1.7)
        ax.set_xlim(-0.6, len(methods) - 0.4)
    else:
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3, color=colours, alpha=0.85)
        if finite:
            lo = min(finite) - 2 * max(stds + [0.0])
            ax.set_ylim(max(0.0, lo - 0.05 * (max(finite) - lo + 1e-9)), min(1.0, max(finite) + 2 * max(stds + [0.0]) + 0.02))
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=8)
    ax.set_title(label)
    ax.grid(alpha=0.3, axis="y", which="both")


def _save(fig, path) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _plt().close(fig)
    return path
