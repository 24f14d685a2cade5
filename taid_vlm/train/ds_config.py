"""The DeepSpeed config of a run, generated from the YAML (or merged into a user's DeepSpeed JSON)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from taid_vlm.config import ConfigError, RunConfig


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def student_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Batch sizes, clipping, precision and ZeRO for the student engine.

    The optimizer and LR schedule are torch objects handed to deepspeed.initialize (no DeepSpeed ops
    to compile on CPU), so the config carries none.
    """
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1 and ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    generated = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if ds.config_file:
        path = Path(cfg.resolve_path(ds.config_file))
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config_file: {path} is not valid JSON: {e}") from None
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ConfigError(
                    f"deepspeed.config_file: {path} sets '{key}'; set it in the YAML's optim section instead"
                )
        # The user's file wins over generated defaults, except the batch geometry which must agree with the YAML.
        generated = _merge(generated, {k: v for k, v in user.items() if k not in (
            "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")})
    return _merge(generated, ds.extra)


def teacher_zero3_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """A ZeRO-3 inference engine for a teacher sharded over the ranks (no optimizer)."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    persistence = cfg.deepspeed.extra.get("zero_optimization", {}).get("stage3_param_persistence_threshold")
    if persistence is not None:
        zero["stage3_param_persistence_threshold"] = persistence
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.train.micro_batch_size * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "steps_per_print": 10**9,
    }
