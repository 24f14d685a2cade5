"""One YAML file describes a run. Loaded into typed dataclasses; every problem names its key.

    cfg = load_config("configs/tiny_vlm.yaml", overrides=["optim.lr=3e-4", "loss.name=fkl"])

Unknown keys, wrong types and bad values raise ConfigError before anything heavy starts. Model
sections (`teacher.model`, `student.model`) may be inline dicts or paths to YAML files; relative paths
anywhere in the config resolve against the config file's folder, so configs run from any directory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from taid_vlm.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration; the message starts with the dotted key (`key.sub: what is wrong`)."""

    def __init__(self, message: str):
        key, sep, what = str(message).partition(": ")
        if sep and key and " " not in key:  # "loss.name: must be one of ..." -> what, where = key
            self.what, self.where = what, key
        else:
            self.what, self.where = str(message), None
        ValueError.__init__(self, message)


def one_of(*choices):
    """A config field with its allowed values written here, once: the first is the default; validate()
    checks every such field (one line naming the key and the choices)."""
    return field(default=choices[0], metadata={"choices": choices})


TRACKERS = ("tensorboard", "wandb", "mlflow")   # train.report_to's names
SAMPLING_MODES = ("off", "mixed", "adaptive", "on_policy")


@dataclass
class TeacherConfig:
    model: Optional[Union[dict, str]] = None   # model config (taid_vlm.models), or a path to its YAML
    placement: str = one_of("replicated", "zero3")  # a frozen copy per device | sharded over ranks
    dtype: Optional[str] = None           # override the model's dtype (default: bf16 on GPU with bf16 precision);
                                          # its names: models/config_checks.py:resolve_dtype (checked by preflight)
    cache: Optional[str] = None           # a top-k teacher cache (data_tools.cache_teacher): no teacher model is built


@dataclass
class StudentConfig:
    model: Optional[Union[dict, str]] = None


@dataclass
class SyntheticData:
    kind: str = one_of("shapes", "shapes_text")
    n: int = 512
    seed: int = 0
    size: int = 64
    val_fraction: float = 0.1


@dataclass
class DataConfig:
    train: Optional[Union[str, list]] = None
    val: Optional[Union[str, list]] = None
    synthetic: Optional[SyntheticData] = None   # generate into `synthetic_dir` when the shards are missing
    synthetic_dir: Optional[str] = None
    text_only: bool = False
    pack: bool = False
    max_length: int = 512
    prompt_tokens: int = 0      # a raw-text document's first N tokens are its prompt (generation metric, sampling);
                                # 0: its first token. Conversations: the sample up to its last assistant turn
    num_workers: int = 0
    shuffle_buffer: int = 1000          # samples per shuffled block: a batch mixes ~this / samples-per-shard shards
    caption_instruction: Optional[str] = None
    # Remote shards (http(s)://, pipe:, gs:// ...) are fetched once per node into this node-local folder
    # (None: $TMPDIR/taid_vlm_shards) and read from there; docs/remote_shards.md.
    cache_dir: Optional[str] = None
    cache_max_gb: float = 64.0          # least recently used shards not in use are removed beyond this
    fetch_retries: int = 3              # more attempts after a failed fetch, then the shard is a counted skip
    # Stop the run (from data_guard.MIN_SAMPLES samples read on) when more than this share of the samples read was
    # skipped, or of the supervised tokens could not be paired between teacher and student (0: stop at any).
    max_skipped_fraction: float = 0.5
    max_unaligned_fraction: float = 0.10


@dataclass
class LossConfig:
    name: str = "taid"
    params: dict = field(default_factory=dict)
    ce_weight: float = 0.0
    chunk_size: Optional[int] = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = one_of("cosine", "linear", "constant")
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = one_of(0, 1, 2, 3)
    offload_optimizer: bool = False
    offload_param: bool = False
    config_file: Optional[str] = None     # a DeepSpeed JSON; our settings fill in what it leaves out
    extra: dict = field(default_factory=dict)   # merged into the generated DeepSpeed config


@dataclass
class TrainConfig:
    total_steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    precision: str = one_of("fp32", "bf16")
    log_every: int = 1
    eval_every: int = 0                   # 0: only at the end
    eval_batches: int = 0                 # 0: the whole val set
    eval_at_start: bool = False           # also evaluate the initial student (step 0)
    eval_generation: int = 0              # score the first N held-out conversations by the student's greedy
                                          # answers (eval_rougeL, eval_exact_match); 0: off
    eval_max_new_tokens: int = 0          # eval_generation's answer length cap (0: sampling.max_new_tokens)
    save_every: int = 0                   # 0: only at the end
    keep_last: int = 2
    max_nonfinite_in_a_row: int = 5       # non-finite micro-batches in a row before the run stops
    resume: Union[bool, str] = False      # false | true | auto
    overwrite: bool = False               # start fresh in a folder of another run (deletes only its checkpoints/,
                                          # metrics.jsonl, config.yaml, tensorboard/)
    loss_jump_factor: float = 100.0       # stop when a step loss exceeds this times the recent median (0: off)
    max_zero_grad_steps: int = 3          # stop after this many steps in a row with gradient norm 0 (0: off)
    param_growth_factor: float = 100.0    # never checkpoint parameters whose norm grew this much since the last
                                          # checkpoint / the start (0: off); non-finite parameters are never saved
    progress_bar: bool = True             # a bar on a terminal, else one line per logged step (false: lines always)
    report_to: Union[list, str] = field(default_factory=lambda: ["tensorboard"])  # names from TRACKERS: a
                                          # list or a comma-separated string; [] or none: no tracker (rank 0 logs)
    tensorboard: bool = True              # false leaves tensorboard out of report_to (the older switch)
    tracker_project: str = "taid-vlm"     # the W&B project / MLflow experiment (WANDB_PROJECT wins for W&B)
    run_name: Optional[str] = None        # the tracker run's name (default: the output folder's name)
    mlflow_tracking_uri: Optional[str] = None  # default: MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db


@dataclass
class SamplingConfig:
    """Student-generated sequences (taid_vlm/train/sampling/). Defaults: the official TAID code's
    sampler (replay buffer 1,000, mixed probability 0.5, adaptive threshold step 0.1, greedy, 512 new
    tokens) and TRL GKD's lmbda 0.5."""
    mode: Union[str, bool] = one_of(*SAMPLING_MODES)  # mixed (GKD) | adaptive (DistiLLM) | on_policy (TRL GKD lmbda)
    lmbda: float = 0.5                    # on_policy: share of micro-batches the student generates
    seq_kd: bool = False                  # on_policy: the other micro-batches are teacher-generated
    mixed_alpha: float = 0.5              # mixed: share of micro-batches replaced from the replay buffer
    capacity: int = 1000                  # mixed, adaptive: replay buffer size (completions)
    threshold_step: float = 0.1           # adaptive: the threshold rises by this when the val loss rises
    replay_ratio: str = one_of("decreasing", "constant", "increasing")  # adaptive: how the fresh-generation share moves
    max_new_tokens: int = 512
    do_sample: bool = False               # false: greedy (the official code); true: temperature / top_p sampling
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output_dir: str = "runs/default"
    seed: int = 0
    config_dir: str = "."                 # set by load_config: where relative paths resolve

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve_path(self, path: Optional[str]) -> Optional[str]:
        if path is None or is_url(str(path)):
            return path
        p = Path(str(path)).expanduser()
        return str(p if p.is_absolute() else (Path(self.config_dir) / p).resolve())

    def shard_spec(self, key: str) -> list:
        """``data.train`` / ``data.val`` as its items (paths, patterns, folders), each local one resolved: always
        a list, so that a brace pattern's commas stay its own; ``data.shards.expand_shards`` turns it into the
        shard list once per run (preflight.shard_lists)."""
        value = getattr(self.data, key)
        if is_mixture(value):  # weighted sources: each source's spec resolved the same way
            return [{"shards": self._resolved_items(src["shards"]), "weight": float(src.get("weight", 1.0))}
                    for src in value]
        return self._resolved_items(value)

    def _resolved_items(self, value) -> list:
        items = shard_spec_items(value)
        return [self.resolve_path(s) for s in (items if isinstance(items, list) else [items])]

    def teacher_use(self) -> Optional[str]:
        """What the run's teacher is for, the one statement of it: ``"loss"`` (a teacher model the loss reads),
        ``"cache"`` (a teacher cache stands in for it; the model is never built), ``"evaluation"`` (an SFT loss
        with ``teacher.model`` given: built only to evaluate against, so SFT curves compare with distillation's)
        or None (no teacher)."""
        from taid_vlm.losses import loss_needs_teacher

        if loss_needs_teacher(self.loss.name):
            if self.teacher.cache is not None:
                return "cache"
            return "loss" if self.teacher.model is not None else None
        return "evaluation" if self.teacher.model is not None else None

    def builds_teacher_model(self) -> bool:
        return self.teacher_use() in ("loss", "evaluation")


# ---- loading -----------------------------------------------------------------------------------

# Config values that are paths (dotted keys), and the keys inside model sections that name local paths.
PATH_KEYS = ("output_dir", "data.train", "data.val", "data.synthetic_dir", "data.cache_dir", "teacher.cache",
             "deepspeed.config_file")
MODEL_PATH_KEYS = ("path", "saved")        # always local folders/files
MODEL_MAYBE_PATH_KEYS = ("pretrained",)    # a local file, or an open_clip tag (kept when no such file exists)


def load_config(path: Union[str, Path, None] = None, overrides: Optional[list] = None, data: Optional[dict] = None) -> RunConfig:
    """Read YAML (or take `data`), apply `key.sub=value` overrides, type-check and validate.

    Relative paths: a path written in a config file (or a model file it names) resolves against the folder
    of that file; a path given on the command line (an override, --output-dir) against the working
    directory. Model files are read before the overrides apply, so `student.model.llm.config.hidden_size=32`
    reaches into `student.model: models/student.yaml`.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        config_dir = Path(path.resolve().parent)
    else:
        raw = copy.deepcopy(data or {})
        config_dir = Path.cwd()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw.setdefault("config_dir", str(config_dir))
    base = Path(raw["config_dir"])
    for role in ("teacher", "student"):
        if isinstance(raw.get(role), dict):
            raw[role]["model"] = _read_model(raw[role].get("model"), base, f"{role}.model")
    keys = []
    for item in overrides or []:
        keys.append(apply_override(raw, item, cwd=Path.cwd()))
    cfg = from_dict(RunConfig, raw, "")
    _drop_params_of_another_loss(cfg, keys)
    validate(cfg)
    return cfg


def _read_model(model, base: Path, where: str):
    """A model section: a path to a model YAML file is read (its paths resolve against its folder)."""
    if isinstance(model, str):
        file = Path(model).expanduser()
        file = file if file.is_absolute() else (base / file)
        if not file.is_file():
            raise ConfigError(f"{where}: file not found: {file.resolve()}")
        try:
            model = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: {file}: not valid YAML: {e}") from None
        if not isinstance(model, dict):
            raise ConfigError(f"{where}: {file} must hold a mapping (a model config)")
        base = file.resolve().parent
    if isinstance(model, dict):
        _resolve_model_paths(model, base)
    return model


def is_url(value: str) -> bool:
    """A remote shard spec (``http://``, ``s3://``, ``pipe:CMD`` ...): never resolved as a path."""
    return "://" in value or value.startswith("pipe:")


def is_mixture(value) -> bool:
    """``data.train`` as weighted sources: a list of ``{shards: SPEC, weight: W}`` (data/mixture.py)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _check_mixture(value) -> None:
    for k, src in enumerate(value):
        unknown = sorted(set(src) - {"shards", "weight"})
        if "shards" not in src or unknown:
            raise ConfigError(f"data.train[{k}]: a source needs 'shards' (and optionally 'weight'), got keys {sorted(src)}")
        weight = src.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"data.train[{k}].weight: must be a number > 0, got {weight!r}")


def shard_spec_items(value):
    """The shard-spec rule for the config's side: a list, or a comma-separated string (unless a brace
    pattern's commas: ``shard-{a,b}.tar``) -> its items (a list); anything else is one item, kept."""
    if isinstance(value, str) and "," in value and "{" not in value:
        return [v.strip() for v in value.split(",")]
    return value


def _absolute(value, cwd: Path):
    """A path value (str, comma-separated str or list) made absolute against `cwd`; remote URLs kept."""
    def one(s: str) -> str:
        s = s.strip()
        if is_url(s):
            return s
        p = Path(s).expanduser()
        return str(p if p.is_absolute() else cwd / p)

    if is_mixture(value):
        return [{**src, "shards": _absolute(src.get("shards"), cwd)} for src in value]
    items = shard_spec_items(value)
    if isinstance(value, str) and isinstance(items, list):  # kept a comma-separated string, as written
        return ",".join(one(v) for v in items)
    if isinstance(items, list):
        return [one(v) if isinstance(v, str) else v for v in items]
    return one(value) if isinstance(value, str) else value


def apply_override(raw: dict, item: str, cwd: Optional[Path] = None) -> str:
    """`a.b.c=value`; value parsed as YAML (numbers, booleans, lists, null). Returns the dotted key.

    With `cwd` (the command line), path values resolve against it: the keys in PATH_KEYS, a model file
    (`student.model=FILE`) and `path`/`saved` entries inside a model section.
    """
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, value = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set '{key}'")
        node = child
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if cwd is not None:
        if key in PATH_KEYS:
            parsed = _absolute(parsed, cwd)
        elif len(parts) == 2 and parts[0] in ("teacher", "student") and parts[1] == "model":
            parsed = _read_model(parsed, cwd, key)
        elif len(parts) > 2 and parts[0] in ("teacher", "student") and parts[1] == "model":
            if isinstance(parsed, dict):
                _resolve_model_paths(parsed, cwd)
            elif parts[-1] in MODEL_PATH_KEYS + MODEL_MAYBE_PATH_KEYS and isinstance(parsed, str):
                probe = {parts[-1]: parsed}
                _resolve_model_paths(probe, cwd)
                parsed = probe[parts[-1]]
    node[parts[-1]] = parsed
    return key


def _drop_params_of_another_loss(cfg: "RunConfig", override_keys: list) -> None:
    """`loss.name=fkl` on the command line over a file written for taid: the file's TAID parameters do not
    apply to fkl. They are dropped with a warning when the loss name came from the command line and the
    parameters did not; parameters the user set for the loss they chose stay errors when wrong."""
    if "loss.name" not in override_keys or any(k == "loss.params" or k.startswith("loss.params.") for k in override_keys):
        return
    from taid_vlm.losses import LOSS_NAMES, loss_parameters

    if cfg.loss.name not in LOSS_NAMES:
        return  # validate() names the bad loss
    accepted = loss_parameters(cfg.loss.name)
    dropped = sorted(k for k in cfg.loss.params if k not in accepted)
    if dropped:
        logging.getLogger("taid_vlm.config").warning(
            "loss.params: %s from the config file do not apply to loss '%s' (set on the command line): dropped",
            ", ".join(dropped), cfg.loss.name)
        cfg.loss.params = {k: v for k, v in cfg.loss.params.items() if k in accepted}


def from_dict(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key (known here: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin is Union:
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of the allowed types")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _resolve_model_paths(model: dict, base: Path) -> None:
    """Local `path:`/`saved:` entries inside a model config resolve against the file that names them
    (`pretrained:` too, when such a file exists: otherwise it is an open_clip tag)."""
    def visit(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in MODEL_PATH_KEYS + MODEL_MAYBE_PATH_KEYS and isinstance(v, str):
                    p = Path(v).expanduser()
                    candidate = p if p.is_absolute() else (base / p).resolve()
                    if k in MODEL_PATH_KEYS or candidate.exists():
                        node[k] = str(candidate)
                else:
                    visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(model)


# ---- validation --------------------------------------------------------------------------------

def _choice(where: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _check_choices(section, where: str) -> None:
    """Every ``one_of`` field of a config section holds one of its values."""
    for f in dataclasses.fields(section):
        if "choices" in f.metadata:
            _choice(f"{where}.{f.name}", getattr(section, f.name), f.metadata["choices"])


def _positive(where: str, value, allow_zero=False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: RunConfig) -> None:
    from taid_vlm.losses import LOSS_NAMES, build_loss, loss_needs_teacher

    if cfg.student.model is None:
        raise ConfigError("student.model: required (a model config or a path to one)")
    if not isinstance(cfg.student.model, dict):
        raise ConfigError("student.model: expected a mapping or a path to a YAML file")
    _choice("loss.name", cfg.loss.name, LOSS_NAMES)
    if loss_needs_teacher(cfg.loss.name) and cfg.teacher_use() is None:
        raise ConfigError(f"teacher.model: required by loss '{cfg.loss.name}' (or teacher.cache: a top-k teacher cache)")
    if cfg.teacher.cache is not None and not (Path(cfg.resolve_path(cfg.teacher.cache)) / "manifest.json").is_file():
        raise ConfigError(f"teacher.cache: {cfg.resolve_path(cfg.teacher.cache)} has no manifest.json (not a teacher "
                          "cache, or its writing did not finish); write one with python -m data_tools.cache_teacher")
    _check_choices(cfg.teacher, "teacher")
    try:
        build_loss(cfg.loss.name, **cfg.loss.params, **({"ce_weight": cfg.loss.ce_weight} if cfg.loss.ce_weight else {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss.params: {e}") from None
    if cfg.loss.chunk_size is not None:
        _positive("loss.chunk_size", cfg.loss.chunk_size)
    _validate_optim(cfg.optim)
    _validate_train(cfg.train)
    _validate_data_and_deepspeed(cfg)
    _validate_sampling(cfg)


def _validate_optim(o: OptimConfig) -> None:
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {o.betas!r}")
    _check_choices(o, "optim")
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)


def _validate_train(t: TrainConfig) -> None:
    _positive("train.total_steps", t.total_steps)
    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.grad_accum", t.grad_accum)
    _check_choices(t, "train")
    _positive("train.log_every", t.log_every)
    for key in ("eval_every", "eval_batches", "save_every", "eval_generation", "eval_max_new_tokens"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    _positive("train.keep_last", t.keep_last)
    _positive("train.max_nonfinite_in_a_row", t.max_nonfinite_in_a_row)
    if t.resume not in (True, False, "auto"):
        raise ConfigError(f"train.resume: must be true, false or auto, got {t.resume!r}")
    if t.resume is True and t.overwrite:
        raise ConfigError("train.overwrite: --overwrite deletes the run that --resume would continue; choose one")
    _positive("train.loss_jump_factor", t.loss_jump_factor, allow_zero=True)
    _positive("train.max_zero_grad_steps", t.max_zero_grad_steps, allow_zero=True)
    _positive("train.param_growth_factor", t.param_growth_factor, allow_zero=True)
    t.report_to = _validate_report_to(t.report_to)


def _validate_report_to(report_to: Union[list, str]) -> list:
    """Known tracker names, and the package of each named one installed (tensorboard: said at start).
    Returns them as a list (`wandb,mlflow` -> [wandb, mlflow]; `none` -> [])."""
    import importlib.util

    if isinstance(report_to, str):
        report_to = [] if report_to.strip() in ("", "none") else [n.strip() for n in report_to.split(",")]
    for name in report_to:
        _choice("train.report_to", name, TRACKERS)
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to: {name} is not installed (pip install {name}, or leave it out)")
    return report_to


def _validate_data_and_deepspeed(cfg: RunConfig) -> None:
    _check_choices(cfg.deepspeed, "deepspeed")
    if cfg.deepspeed.config_file is not None and not Path(cfg.resolve_path(cfg.deepspeed.config_file)).is_file():
        raise ConfigError(f"deepspeed.config_file: file not found: {cfg.resolve_path(cfg.deepspeed.config_file)}")
    d = cfg.data
    if d.train is None:
        raise ConfigError("data.train: required (shard pattern, folder, glob or list)")
    if is_mixture(d.train):
        _check_mixture(d.train)
    if is_mixture(d.val):
        raise ConfigError("data.val: weighted sources are for data.train; list the held-out shards instead")
    if d.synthetic is not None:
        _check_choices(d.synthetic, "data.synthetic")
        _positive("data.synthetic.n", d.synthetic.n)
        if d.synthetic_dir is None:
            raise ConfigError("data.synthetic_dir: required with data.synthetic (where to generate the shards)")
    _positive("data.max_length", d.max_length)
    _positive("data.prompt_tokens", d.prompt_tokens, allow_zero=True)
    if d.prompt_tokens >= d.max_length:
        raise ConfigError(f"data.prompt_tokens: {d.prompt_tokens} leaves no continuation within data.max_length "
                          f"{d.max_length}; use fewer")
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    _positive("data.cache_max_gb", d.cache_max_gb)
    _positive("data.fetch_retries", d.fetch_retries, allow_zero=True)
    for key in ("max_skipped_fraction", "max_unaligned_fraction"):
        if not 0 <= getattr(d, key) <= 1:
            raise ConfigError(f"data.{key}: must be in [0, 1], got {getattr(d, key)}")
    if d.pack and not d.text_only:
        raise ConfigError("data.pack: packing needs data.text_only: true")


def _validate_sampling(cfg: RunConfig) -> None:
    from taid_vlm.losses import loss_needs_teacher

    s = cfg.sampling
    if s.mode is False:  # YAML 1.1 reads an unquoted `off` as false
        s.mode = "off"
    _check_choices(s, "sampling")
    for key in ("lmbda", "mixed_alpha", "threshold_step"):
        if not 0 <= getattr(s, key) <= 1:
            raise ConfigError(f"sampling.{key}: must be in [0, 1], got {getattr(s, key)}")
    _positive("sampling.capacity", s.capacity)
    _positive("sampling.max_new_tokens", s.max_new_tokens)
    _positive("sampling.temperature", s.temperature)
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"sampling.top_p: must be in (0, 1], got {s.top_p}")
    if s.seq_kd and s.mode != "on_policy":
        raise ConfigError(f"sampling.seq_kd: teacher-generated micro-batches belong to mode on_policy, got {s.mode!r}")
    if s.mode == "off":
        return
    if cfg.teacher.cache is not None:
        raise ConfigError(f"sampling.mode: {s.mode} scores newly generated text, which a teacher cache "
                          "(teacher.cache) cannot; use teacher.model, or sampling.mode: off")
    if not loss_needs_teacher(cfg.loss.name):
        raise ConfigError(f"sampling.mode: {s.mode} needs a loss that uses the teacher, got loss '{cfg.loss.name}'")
    if cfg.data.pack:
        raise ConfigError(f"sampling.mode: {s.mode} generates per sample; it does not work with data.pack: true")
    if s.mode in ("mixed", "adaptive") and not cfg.data.text_only:
        raise ConfigError(f"sampling.mode: {s.mode}'s replay buffer holds text only so far; with images use "
                          "on_policy, or data.text_only: true")
    if s.mode == "adaptive" and (cfg.data.val is None or not cfg.train.eval_every):
        raise ConfigError("sampling.mode: adaptive raises its threshold from validation losses during the run; "
                          "set data.val and train.eval_every")
