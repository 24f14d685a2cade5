"""The TAID t plot: t over the steps beside its linear floor, titled by what t did.

TAID's t never falls below the linear schedule t_start + (t_end - t_start) * step / total_steps (the
floor); the adaptive term can only lift it above. The title says which happened, from the run's own
metrics, e.g. "TAID t: 0.40 -> 1.00 over 400 steps, on its linear floor".

    floor = schedule_floor(run_dir)            # from RUN_DIR/config.yaml: loss.name, loss.params, total_steps
    plot_taid_t(metrics, floor, "taid_t.png")      # draw_taid_t: the figure
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import yaml

from .colours import method_colour
from .report import _plt, _save
from .runs import Metrics

Floor = Callable[[int], float]

# t is logged rounded to 4 decimals: a lift below this is rounding, not the adaptive term.
LIFT_TOLERANCE = 1e-3


def schedule_floor(run_dir: Path) -> Optional[Floor]:
    """step -> the run's linear floor of t, built by the loss itself from RUN_DIR/config.yaml; None if the
    run's loss has no TAID schedule."""
    from taid_vlm.losses import build_loss

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    loss = build_loss(cfg["loss"]["name"], **(cfg["loss"].get("params") or {}))
    schedule = getattr(loss, "schedule", None)
    if schedule is None:
        return None
    total = int(cfg["train"]["total_steps"])
    return lambda step: schedule.linear(step, total)


def t_title(steps: list[int], ts: list[float], floor: Floor) -> str:
    """What t did: where it started and ended, over how many steps, and how far the adaptive term lifted
    it above the linear floor (the largest lift and the first step it was reached)."""
    head = f"TAID t: {ts[0]:.2f} -> {ts[-1]:.2f} over {steps[-1]} steps"
    at, lift = max(((s, t - floor(s)) for s, t in zip(steps, ts)), key=lambda x: x[1])
    if lift < LIFT_TOLERANCE:
        return head + ", on its linear floor"
    return head + f", lifted up to {lift:.3f} above its linear floor (step {at})"


def plot_taid_t(metrics: Metrics, floor: Floor, path: Path) -> Optional[Path]:
    """draw_taid_t written to `path` as a PNG. None (and no file) if no step logged t."""
    fig = draw_taid_t(metrics, floor)
    return None if fig is None else _save(fig, path)


def draw_taid_t(metrics: Metrics, floor: Floor):
    """t (TAID's colour) and the floor (dashed), titled by t_title; None if no step logged t."""
    steps, ts = metrics.series("t")
    if not steps:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(steps, ts, color=method_colour("taid"), linewidth=2.0, label="t (TAID student)")
    # the floor on top, dashed: where t sits on it, both stay visible
    ax.plot(steps, [floor(s) for s in steps], linestyle="--", color="black", linewidth=0.9, label="linear floor")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("t (teacher's weight in the target)")
    ax.set_title(t_title(steps, ts, floor), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
