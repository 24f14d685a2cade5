"""Checks that run before anything heavy is built: a mistake costs seconds, not a model load or a run.

- model files: every key inside a Hugging Face config dict (`llm.config`, an hf_vlm `config`, their
  `text_config`/`vision_config`) must be one the HF config class knows: a typo (`hiden_size`) would
  otherwise be stored as a stray attribute and the model silently built at the default size;
- the teacher's dtype name (teacher.dtype), from the one list of names (models/config_checks.py);
- paths: every local path a model section names (`path`, `saved`, a tokenizer folder), the training
  AND validation shards, the teacher cache;
- resume: the checkpoint's saved config against this one (model shapes, loss, batch layout): a change
  is one line naming what changed and how to start fresh.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from taid_vlm.config import MODEL_PATH_KEYS, ConfigError, RunConfig
from taid_vlm.errors import UserError

# Keys HF configs accept beside their __init__ parameters (converted or kept by PretrainedConfig).
_LEGACY_HF_KEYS = {"rope_theta", "rope_scaling", "torch_dtype", "name_or_path", "_name_or_path", "output_attentions",
                   "model_type", "transformers_version", "architectures", "auto_map", "use_return_dict"}


# ---- model files ----------------------------------------------------------------------------------

def _known_hf_keys(config_class) -> set[str]:
    known = set(_LEGACY_HF_KEYS)
    for klass in inspect.getmro(config_class):
        if klass is object:
            continue
        try:
            known |= {k for k in inspect.signature(klass.__init__).parameters if k not in ("self", "args", "kwargs")}
        except (TypeError, ValueError):
            pass
        known |= set(getattr(klass, "attribute_map", {}) or {})
    known |= set(getattr(config_class, "sub_configs", {}) or {})
    try:
        known |= set(config_class().to_dict())
    except Exception:  # a config class that cannot be built with defaults: the signature is enough
        pass
    return known


def check_hf_config(conf: dict, where: str, config_class=None, also_known: frozenset = frozenset()) -> None:
    """Unknown keys of a Hugging Face config dict -> ConfigError naming the key and the known ones."""
    from transformers import CONFIG_MAPPING

    model_type = conf.get("model_type")
    if model_type is not None:
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(f"{where}.model_type: unknown Hugging Face model type {model_type!r}")
        config_class = CONFIG_MAPPING[model_type]
    if config_class is None:
        return
    known = _known_hf_keys(config_class) | also_known
    for key in conf:
        if key not in known:
            shown = sorted(k for k in known if not k.startswith("_"))
            close = difflib.get_close_matches(key, shown, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{where}.{key}: unknown key for {config_class.__name__}; {hint}known: {', '.join(shown)}")
    try:  # keys the class itself writes into its default sub-configs count as known there
        defaults = config_class().to_dict()
    except Exception:
        defaults = {}
    for key, sub_class in (getattr(config_class, "sub_configs", {}) or {}).items():
        if isinstance(conf.get(key), dict):
            sub_class = sub_class if inspect.isclass(sub_class) else None  # AutoConfig: by its model_type
            sub_defaults = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
            check_hf_config(conf[key], f"{where}.{key}", sub_class, frozenset(sub_defaults))


def _hf_config_dicts(node: Any, where: str) -> Iterator[tuple[dict, str]]:
    """Every HF config dict inside a model section: a `config` mapping with a model_type."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "config" and isinstance(v, dict) and "model_type" in v:
                yield v, f"{where}.{k}"
            else:
                yield from _hf_config_dicts(v, f"{where}.{k}")


def _local_paths(node: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in MODEL_PATH_KEYS and isinstance(v, str):
                yield v, f"{where}.{k}"
            else:
                yield from _local_paths(v, f"{where}.{k}")


def check_model_sections(cfg: RunConfig) -> None:
    from taid_vlm.models.config_checks import resolve_dtype  # the one list of dtype names

    if cfg.teacher.dtype is not None:
        try:
            resolve_dtype(cfg.teacher.dtype, "teacher.dtype")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    roles = [("student", cfg.student.model)]
    if cfg.builds_teacher_model():  # for the loss, or only to evaluate an SFT run against: built either way
        roles.append(("teacher", cfg.teacher.model))
    for role, model in roles:
        if not isinstance(model, dict):
            continue
        for path, where in _local_paths(model, f"{role}.model"):
            if not Path(path).exists():
                raise ConfigError(f"{where}: not found: {path}")
        for conf, where in _hf_config_dicts(model, f"{role}.model"):
            check_hf_config(conf, where)


# ---- data -----------------------------------------------------------------------------------------

def shard_lists(cfg: RunConfig, keys=("train", "val")) -> dict[str, list[str]]:
    """data.train and data.val expanded to shard lists, once per run (the loaders and the cache writer take
    these); a missing one is a ConfigError naming the key. An unset key is left out."""
    from taid_vlm.data.shards import expand_shards

    out = {}
    for key in keys:
        if getattr(cfg.data, key) is None:
            continue
        spec = cfg.shard_spec(key)
        try:
            if spec and isinstance(spec[0], dict):  # weighted sources: each expanded, weights kept
                out[key] = [{**src, "shards": expand_shards(src["shards"])} for src in spec]
            else:
                out[key] = expand_shards(spec)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.{key}: {e}") from None
    return out


def all_shards(listed: list) -> list[str]:
    """The shard paths of a ``shard_lists`` entry, the sources of a weighted mixture one after another."""
    return [p for src in listed for p in src["shards"]] if listed and isinstance(listed[0], dict) else listed


# ---- resume ---------------------------------------------------------------------------------------

# What a resumed run must share with the checkpoint: the shapes of the saved state, the objective and
# the order of the data. Steps, the optimizer's settings (put back after loading:
# components.apply_optim_config), logging and evaluation may change, and so may train.grad_accum: it
# changes with the world size on an elastic resume (2 processes x 2 -> 1 x 4); the data loader's state
# checks the step layout itself.
RESUME_MUST_MATCH = ("student.model", "teacher.model", "teacher.cache", "loss.name", "loss.params", "loss.ce_weight",
                     "train.micro_batch_size", "data.max_length", "data.pack", "data.text_only", "seed")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def config_differences(old: Any, new: Any, where: str) -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            yield from config_differences(old.get(k), new.get(k), f"{where}.{k}")
    elif old != new and not (isinstance(old, (int, float)) and isinstance(new, (int, float)) and float(old) == float(new)):
        yield f"{where}: {old!r} -> {new!r}"


def saved_config(checkpoint: Path) -> Optional[dict]:
    """The run config a checkpoint was written with (its config.yaml, else the run folder's)."""
    for candidate in (Path(checkpoint) / "config.yaml", Path(checkpoint).parent.parent / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text())
    return None


def check_resume_compatible(cfg: RunConfig, checkpoint: Path) -> None:
    old = saved_config(checkpoint)
    if old is None:
        return
    new = cfg.to_dict()
    changes = [line for key in RESUME_MUST_MATCH for line in config_differences(_get(old, key), _get(new, key), key)]
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise UserError(f"cannot resume: the config changed since {Path(checkpoint).name} was written ({shown}); "
                        "undo the change, or start fresh with --overwrite or a new --output-dir", where=str(checkpoint))


# ---- all of it, in order ----------------------------------------------------------------------------

def prepare_run(cfg: RunConfig, out_dir: Path, rank: int) -> Optional[Path]:
    """Every rank, before any model is built. Returns the checkpoint to resume from (None: a fresh run).

    The checks only read, so every rank reaches the same verdict; rank 0 then clears (`--overwrite`) or
    tidies (stale `.tmp-*`) the folder and records this run's config.yaml.
    """
    from . import checkpoint as ckpt
    from .launch_env import barrier
    from .run_folder import check_run_folder, clean_stale_temporaries, clear_run_folder

    ckpt_root = Path(out_dir) / "checkpoints"
    resume, overwrite = cfg.train.resume, cfg.train.overwrite
    found = ckpt.latest_checkpoint(ckpt_root) if resume and not overwrite else None
    if resume is True and found is None:
        raise UserError("--resume: no complete checkpoint to continue from; start a new run without --resume",
                        where=str(ckpt_root))
    if found is not None:
        check_resume_compatible(cfg, found)
    check_run_folder(out_dir, resuming=found is not None, overwrite=overwrite)
    check_model_sections(cfg)
    barrier()  # every rank has looked at the folder before rank 0 changes it
    if rank == 0:
        if overwrite:
            clear_run_folder(out_dir)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(ckpt_root)
        (Path(out_dir) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    barrier()
    return found
