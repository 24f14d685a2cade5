"""`taid-vlm compare CONFIG --losses taid,fkl,rkl,... [--seeds 3 | --seeds 7,8] [--steps N] [--out DIR]`

Runs every loss on the same data, teacher, student initialisation, number of steps and seeds, and
writes one table: the final held-out metrics, mean ± sample std over the seeds. Per seed s, the run is
`taid-vlm train CONFIG seed=s loss.name=LOSS` (the student is built right after torch.manual_seed(seed),
so all losses start from the same student for a seed; seed also orders the data stream; the teacher
is the config's, frozen). A loss other than the config's own runs with its default parameters
(`loss.params={}`); the config's loss keeps its parameters. Extra `key=value` overrides apply to every run;
one of a key compare sets itself (seed, loss.name, ...: COMPARE_SETS) is refused, not silently replaced.
`--seeds 3` runs seeds 0, 1, 2; `--seeds 7,8` runs those: with the same --out, finished runs are reused,
so `--seeds 0,1,2,7,8` adds two seeds to a table of three.
Besides loss names, `--losses` takes methods (methods.py): `LOSS+MODE` (e.g. `taid+on_policy`: the loss
trained on student-generated text, docs/sampling.md) and the paper's protocols `gkd` (gjsd 0.1 + mixed)
and `distillm` (sfkl 0.1 + adaptive).

A capacity-gap study config (`study: capacity_gap`, see configs/demo/capacity_gap.yaml) trains each
listed teacher with cross-entropy on the same data, then runs the comparison once per teacher, and
writes how the margin of TAID over each baseline changes with the teacher's size.

Writes OUT/compare.md, OUT/compare.json, OUT/compare.png and OUT/runs/LOSS/seedS/ (one run each).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from .colours import method_colour
from .methods import MethodError, method_overrides, split_method
from .report import (COMPARE_METRICS, Stat, _plt, _save, aggregate, compare_rows, harness_metrics, markdown_table,
                     plot_compare, text_table, with_derived)
from .runs import Metrics, TrainJob, overrides_text, run_export, run_training

DEFAULT_LOSSES = ("taid", "fkl", "rkl", "sfkl")


class CompareError(ValueError):
    """Bad arguments or a config compare cannot run; the message says what to fix."""


def parse_losses(text: str) -> list[str]:
    """Loss names and methods (methods.py: `taid+on_policy`, `gkd`, `distillm`)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise CompareError("--losses: give at least one loss name, e.g. --losses taid,fkl,rkl")
    for name in names:
        try:
            split_method(name)
        except MethodError as e:
            raise CompareError(f"--losses: {e}") from None
    if len(set(names)) != len(names):
        raise CompareError(f"--losses: a loss is listed twice: {text}")
    return names


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1) or explicit seeds separated by commas (``7,8``; one seed: ``7,``)."""
    if "," not in text:
        count = _integer(text)
        if count < 1:
            raise CompareError(f"--seeds: a count must be at least 1, got {count}")
        return list(range(count))
    seeds = [_integer(x) for x in text.split(",") if x.strip()]
    if not seeds or any(s < 0 for s in seeds):
        raise CompareError(f"--seeds: give seeds >= 0, e.g. --seeds 7,8 (got {text!r})")
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds: a seed is listed twice: {text}")
    return seeds


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise CompareError(f"--seeds: expected a count (3: seeds 0,1,2) or a list of seeds (7,8), got {text!r}") from None


def seeds_text(seeds: Sequence[int]) -> str:
    """``--seeds`` that runs exactly these seeds (a count when they are 0..N-1)."""
    seeds = list(seeds)
    if seeds == list(range(len(seeds))):
        return str(len(seeds))
    return ",".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")


# Keys compare sets on every run itself: an override of one would be replaced without a word.
COMPARE_SETS = {"seed": "give the seeds with --seeds (a count N: 0..N-1, or a list: --seeds 7,8)",
                "loss.name": "give the losses with --losses", "train.total_steps": "give the steps with --steps",
                "output_dir": "give the folder with --out",
                "train.eval_every": "compare evaluates each run 10 times and at step 0",
                "train.eval_at_start": "compare evaluates each run 10 times and at step 0"}


def check_overrides(overrides: Sequence[str]) -> None:
    """``key=value`` overrides, none of a key compare sets itself (COMPARE_SETS)."""
    for item in overrides:
        if "=" not in item:
            raise CompareError(f"override {item!r} must look like key.sub=value")
        key = item.split("=", 1)[0].strip()
        if key in COMPARE_SETS:
            raise CompareError(f"{item}: compare sets {key} for every run itself; {COMPARE_SETS[key]}")


def is_study(path: Path) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "study" in raw


@dataclass
class CompareResult:
    losses: list[str]
    seeds: list[int]
    steps: int
    per_run: dict[str, list[dict]]          # loss -> final eval (plus perplexity) of each seed
    agg: dict[str, dict[str, Stat]]
    curves: dict[str, list[Metrics]]
    teacher: dict                            # the teacher's held-out CE / accuracy (same for every run)
    command: str
    seconds: float


def check_config(config: Path, overrides: Sequence[str], losses: Sequence[str], method: str = ""):
    """Load the config as the trainer will (errors name the key); the teacher must exist for distillation."""
    from taid_vlm.config import ConfigError, load_config

    if not Path(config).is_file():
        raise CompareError(f"config file not found: {config}")
    try:
        cfg = load_config(config, list(overrides))
    except ConfigError as e:
        raise CompareError(f"config error{f' for method {method}' if method else ''}: {e}") from None
    if cfg.data.val is None:
        raise CompareError(f"{config}: data.val is required: compare reports held-out metrics")
    teacher = cfg.teacher.model
    if isinstance(teacher, dict) and set(teacher) == {"saved"}:  # every run loads it (SFT: to evaluate against)
        saved = Path(str(teacher["saved"]))
        if not saved.is_dir():
            raise CompareError(
                f"teacher.model.saved: {saved} does not exist. Train the teacher first (`taid-vlm demo` writes "
                "runs/demo/teacher/model for configs/demo/distill.yaml), or pass teacher.model='{saved: DIR}'.")
    return cfg


def run_compare(config: Path, losses: Sequence[str], seeds: Sequence[int], steps: Optional[int], out: Path,
                overrides: Sequence[str] = (), eval_points: int = 10, fresh: bool = False,
                echo: Callable[[str], None] = print, title: str = "") -> CompareResult:
    config = Path(config).resolve()
    out = Path(out).resolve()
    cfg = check_config(config, overrides, losses)
    steps = steps or cfg.train.total_steps
    eval_every = max(1, steps // eval_points) if eval_points else 0
    base = [*overrides, f"train.eval_every={eval_every}", "train.eval_at_start=true"]
    own_loss = cfg.loss.name
    for method in losses:  # a method the config cannot run (e.g. a replay buffer with images) fails before any run
        try:
            extra = method_overrides(method, own_loss)
        except MethodError as e:  # a study's list of losses comes from its file, not from --losses
            raise CompareError(f"losses: {e}") from None
        check_config(config, [*base, *extra], [method], method)
    start = time.time()
    per_run: dict[str, list[dict]] = {}
    curves: dict[str, list[Metrics]] = {}
    teacher: dict = {}
    n_runs, done = len(losses) * len(seeds), 0
    for seed in seeds:  # seed-major: a partial sweep already holds every loss for the first seeds
        for loss in losses:
            loss_overrides = method_overrides(loss, own_loss)
            job = TrainJob(name=f"{loss} seed {seed} ({done + 1}/{n_runs})", config=config,
                           run_dir=out / "runs" / loss / f"seed{seed}", steps=steps,
                           overrides=[*base, f"seed={seed}", *loss_overrides])
            metrics = run_training(job, fresh=fresh, echo=echo)
            done += 1
            final = metrics.final_eval
            per_run.setdefault(loss, []).append(with_derived(final))
            curves.setdefault(loss, []).append(metrics)
            if "eval_teacher_ce" in final and not teacher:
                teacher = {k: final[k] for k in ("eval_teacher_ce", "eval_teacher_acc") if k in final}
    keys = [k for k, _, _ in COMPARE_METRICS] + ["eval_teacher_ce", "eval_teacher_acc", "eval_tokens"]
    keys += [k for k, _, _ in harness_metrics(k for runs in per_run.values() for r in runs for k in r)]
    agg = aggregate(per_run, keys)
    command = ("taid-vlm compare " + _rel(config) + f" --losses {','.join(losses)} --seeds {seeds_text(seeds)}"
               f" --steps {steps}" + (f" --out {_rel(out)}" if out else "")
               + (" " + overrides_text(overrides) if overrides else ""))
    result = CompareResult(list(losses), list(seeds), steps, per_run, agg, curves, teacher, command,
                           time.time() - start)
    write_compare(result, out, title or f"{config.name}: {steps} steps, {len(seeds)} seed(s)")
    return result


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def margins(agg: dict[str, dict[str, Stat]], key: str = "eval_kl", ref: str = "taid") -> dict[str, float]:
    """baseline mean - TAID mean of a lower-is-better metric (positive: TAID is lower)."""
    if ref not in agg or key not in agg[ref]:
        return {}
    return {m: s[key].mean - agg[ref][key].mean for m, s in agg.items() if m != ref and key in s}


def verdict(agg: dict[str, dict[str, Stat]], key: str = "eval_kl") -> list[str]:
    """One honest line per baseline: is TAID's mean lower, and by how many seed standard deviations."""
    lines = []
    if "taid" not in agg:
        return lines
    ref = agg["taid"][key]
    for m, stats in agg.items():
        if m == "taid" or key not in stats:
            continue
        other = stats[key]
        diff = other.mean - ref.mean
        spread = math.sqrt((ref.std ** 2 + other.std ** 2) / 2) if min(ref.n, other.n) > 1 else float("nan")
        if math.isfinite(spread) and spread > 0:
            sig = f", {abs(diff) / spread:.1f} pooled seed-std"
        else:
            sig = ""
        word = "lower" if diff > 0 else "higher"
        lines.append(f"- TAID vs {m}: TAID's held-out KL is {word} by {abs(diff):.4f} "
                     f"({ref.mean:.4f} vs {other.mean:.4f}{sig}; {100 * abs(diff) / max(other.mean, 1e-12):.1f} %)")
    return lines


def write_compare(result: CompareResult, out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header, rows = compare_rows(result.agg, COMPARE_METRICS + harness_metrics(k for s in result.agg.values() for k in s))
    png = plot_compare(result.agg, result.curves, out / "compare.png", title=title)
    md = [f"# {title}", "", "```bash", result.command, "```", "",
          f"Final held-out metrics after {result.steps} optimizer steps; mean ± sample std over seeds "
          f"{', '.join(map(str, result.seeds))} (same data, teacher, student initialisation and steps for every "
          "method; best mean in bold). KL(T‖S) and top-1 agreement compare the student with the teacher on the "
          "supervised (answer) tokens of the validation set; accuracy is argmax == target per answer token.", "",
          markdown_table(header, rows)]
    if result.teacher:
        md += [f"Teacher on the same tokens: CE {result.teacher.get('eval_teacher_ce', float('nan')):.4f}, "
               f"answer-token accuracy {result.teacher.get('eval_teacher_acc', float('nan')):.4f}.", ""]
    lines = verdict(result.agg)
    if lines:
        md += ["TAID against each baseline (held-out KL, lower is better):", "", *lines, ""]
    md += [f"![held-out KL over training and final metrics]({png.name})", "",
           f"Wall time: {result.seconds / 60:.1f} min for {sum(len(v) for v in result.per_run.values())} runs. "
           "Per-run metrics: `runs/LOSS/seedS/metrics.jsonl`.", ""]
    (out / "compare.md").write_text("\n".join(md))
    payload = {
        "command": result.command, "steps": result.steps, "seeds": result.seeds, "losses": result.losses,
        "teacher": result.teacher, "per_run": result.per_run,
        "mean_std": {m: {k: {"mean": s.mean, "std": s.std, "n": s.n} for k, s in stats.items()}
                     for m, stats in result.agg.items()},
        "seconds": result.seconds,
    }
    (out / "compare.json").write_text(json.dumps(payload, indent=1, default=_nan_none))
    print("\n" + text_table(header, [[c.replace("**", "") for c in r] for r in rows]))
    for line in lines:
        print(line[2:])
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'}, {png}")


def _nan_none(x):
    return None


# ---- capacity-gap study ---------------------------------------------------------------------------

STUDY_KEYS = {"study", "distill", "teacher_recipe", "teacher_steps", "teachers", "losses", "seeds", "steps",
              "overrides", "teacher_overrides"}


def load_study(path: Path) -> dict:
    path = Path(path).resolve()
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise CompareError(f"{path}: {unknown[0]}: unknown key (known here: {', '.join(sorted(STUDY_KEYS))})")
    if raw.get("study") != "capacity_gap":
        raise CompareError(f"{path}: study: must be capacity_gap, got {raw.get('study')!r}")
    for key in ("distill", "teacher_recipe", "teachers"):
        if key not in raw:
            raise CompareError(f"{path}: {key}: required")
    teachers = raw["teachers"]
    if not isinstance(teachers, list) or not teachers or not all(isinstance(t, dict) and {"name", "model"} <= set(t) for t in teachers):
        raise CompareError(f"{path}: teachers: a list of {{name, model}} entries, smallest first")
    base = path.parent
    raw["distill"] = str((base / raw["distill"]).resolve())
    raw["teacher_recipe"] = str((base / raw["teacher_recipe"]).resolve())
    for t in teachers:
        if isinstance(t["model"], str):
            t["model"] = str((base / t["model"]).resolve())
    return raw


def teacher_override(saved: Path) -> str:
    """The override that loads an exported teacher: a taid-vlm model folder, or (a text-only run exports a
    plain Hugging Face causal LM) that folder as a `causal_lm` with its own tokenizer."""
    if (Path(saved) / "taid_model.json").is_file():
        return f"teacher.model={{saved: {saved}}}"
    return f"teacher.model={{type: causal_lm, tokenizer: {{path: {saved}}}, llm: {{path: {saved}}}}}"


def run_capacity_gap(path: Path, losses: Optional[Sequence[str]], seeds: Optional[Sequence[int]], steps: Optional[int],
                     out: Path, overrides: Sequence[str] = (), fresh: bool = False,
                     echo: Callable[[str], None] = print) -> dict:
    """Train each teacher (CE), then compare the losses on the same student once per teacher."""
    from .runs import count_parameters

    study = load_study(path)
    out = Path(out).resolve()
    losses = list(losses or study.get("losses") or DEFAULT_LOSSES)
    if "taid" not in losses:
        raise CompareError("capacity-gap study: --losses must include taid (the margins are TAID's)")
    seeds = list(seeds if seeds is not None else range(int(study.get("seeds", 1))))
    steps = steps or study.get("steps")
    t_steps = int(study.get("teacher_steps", 500))
    rows = []
    per_teacher = {}
    start = time.time()
    for t in study["teachers"]:
        name, model = t["name"], t["model"]
        echo(f"== capacity gap: teacher {name} ==")
        t_dir = out / "teachers" / name
        model_arg = model if isinstance(model, str) else json.dumps(model)
        job = TrainJob(name=f"teacher {name}", config=Path(study["teacher_recipe"]), run_dir=t_dir / "run",
                       steps=t_steps, overrides=[f"student.model={model_arg}", *study.get("teacher_overrides", []),
                                                 *t.get("overrides", []), *overrides])
        t_metrics = run_training(job, fresh=fresh, echo=echo)
        saved = run_export(t_dir / "run", t_dir / "model", fresh=fresh, echo=echo)
        params = count_parameters(saved)["total"]
        res = run_compare(Path(study["distill"]), losses, seeds, steps, out / "compare" / name,
                          overrides=[*study.get("overrides", []), *overrides, teacher_override(saved)],
                          fresh=fresh, echo=echo, title=f"teacher {name} ({params / 1e6:.2f} M parameters)")
        per_teacher[name] = {"params": params, "teacher_eval": t_metrics.final_eval, "agg": res.agg}
        row = [name, f"{params / 1e6:.2f} M", f"{t_metrics.final_eval.get('eval_student_acc', float('nan')):.3f}"]
        for m in losses:
            row.append(res.agg[m]["eval_kl"].fmt())
        for m in losses:
            if m != "taid":
                d = margins(res.agg)[m]
                row.append(f"{d:+.4f} ({100 * d / max(res.agg[m]['eval_kl'].mean, 1e-12):+.1f} %)")
        for m in losses:
            row.append(res.agg[m]["eval_student_acc"].fmt(3))
        rows.append(row)
    _write_gap_report(path, out, losses, seeds, steps, rows, per_teacher, time.time() - start)
    return per_teacher


def _write_gap_report(path: Path, out: Path, losses: list, seeds: list, steps, rows: list, per_teacher: dict,
                      seconds: float) -> None:
    header = (["teacher", "parameters", "teacher answer-token acc"] + [f"KL {m}" for m in losses]
              + [f"{m} − taid KL" for m in losses if m != "taid"] + [f"student acc {m}" for m in losses])
    md = ["# Capacity-gap study: one student, teachers of growing size", "", "```bash",
          f"taid-vlm compare {_rel(Path(path))} --losses {','.join(losses)} --seeds {seeds_text(seeds)}"
          + (f" --steps {steps}" if steps else "") + f" --out {_rel(out)}", "```", "",
          "Held-out KL(teacher ‖ student) per answer token after the same number of steps (mean ± std over seeds), "
          "and the margin baseline − TAID (positive: TAID is closer to the teacher). KL values of different "
          "teachers are not comparable with each other (each row has its own teacher); margins and student "
          "accuracy are.", "", markdown_table(header, rows), "",
          f"Wall time: {seconds / 60:.1f} min. Per-teacher tables: `compare/NAME/compare.md`.", ""]
    png = _plot_gap(per_teacher, losses, out / "capacity_gap.png")
    md.insert(-2, f"![student KL and accuracy against teacher size]({png.name})\n")
    (out / "capacity_gap.md").write_text("\n".join(md))
    (out / "capacity_gap.json").write_text(json.dumps(
        {n: {"params": v["params"], "teacher_eval": v["teacher_eval"],
             "mean_std": {m: {k: {"mean": s.mean, "std": s.std, "n": s.n} for k, s in st.items()} for m, st in v["agg"].items()}}
         for n, v in per_teacher.items()}, indent=1, default=_nan_none))
    print("\n" + text_table(header, rows))
    print(f"\nwrote {out / 'capacity_gap.md'}, {png}")


def _plot_gap(per_teacher: dict, losses: Sequence[str], path: Path) -> Path:
    return _save(draw_capacity_gap(per_teacher, losses), path)


def draw_capacity_gap(per_teacher: dict, losses: Sequence[str]):
    """Student KL (log axis) and accuracy against teacher size, one colour per method (colours.py)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    names = list(per_teacher)
    xs = [per_teacher[n]["params"] / 1e6 for n in names]
    for m in losses:
        for ax, key in zip(axes, ("eval_kl", "eval_student_acc")):
            ys = [per_teacher[n]["agg"][m][key].mean for n in names]
            es = [per_teacher[n]["agg"][m][key].std for n in names]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m, color=method_colour(m))
    teacher_acc = [per_teacher[n]["teacher_eval"].get("eval_student_acc", float("nan")) for n in names]
    axes[1].plot(xs, teacher_acc, linestyle="--", color=method_colour("teacher"), marker="s", label="teacher")
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("held-out KL(T‖S) of the student ↓", "student answer-token accuracy ↑")):
        ax.set_xscale("log")
        ax.set_xlabel("teacher parameters (M)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def run_cli(config: str, losses: Optional[list], seeds: Optional[Sequence[int]], steps: Optional[int],
            out: Optional[str], overrides: list, fresh: bool = False) -> int:
    """`taid-vlm compare`: a training config -> run_compare; a study config -> run_capacity_gap. ``seeds``:
    the seeds to run (default: 0, or the study's count)."""
    path = Path(config)
    if not path.is_file():
        raise CompareError(f"config file not found: {config}")
    check_overrides(overrides)
    out_dir = Path(out) if out else Path("runs") / "compare" / path.stem
    if is_study(path):
        run_capacity_gap(path, losses, seeds, steps, out_dir, overrides, fresh)
    else:
        run_compare(path, losses or list(DEFAULT_LOSSES), list(seeds or [0]), steps, out_dir, overrides, fresh=fresh)
    return 0
