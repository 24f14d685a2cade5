"""Config validation shared by the model builders: every error names the offending key."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def check_keys(cfg: Any, allowed: Iterable[str], where: str, required: Iterable[str] = ()) -> dict:
    """Return ``cfg`` as a dict; ValueError naming ``where.key`` for unknown or missing keys."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(cfg).__name__} ({cfg!r})")
    allowed = list(allowed)
    for key in cfg:
        if key not in allowed:
            raise ValueError(f"{where}.{key}: unknown key; choose from {sorted(allowed)}")
    for key in required:
        if cfg.get(key) is None:
            raise ValueError(f"{where}.{key}: required")
    return dict(cfg)


def choose(value: Any, choices: Iterable[str], where: str, what: str) -> str:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{where}: unknown {what} {value!r}; choose from {sorted(choices)}")
    return value


def resolve_dtype(value: Any, where: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value is None:
        return torch.float32
    if value not in _DTYPES:
        raise ValueError(f"{where}: unknown dtype {value!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[value]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
