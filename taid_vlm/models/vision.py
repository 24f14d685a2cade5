"""Vision towers by name, like the projectors: ``build_vision({type: open_clip, ...}, dtype)``.

A new tower family is a VisionEncoder subclass (vision_encoder.py) and one function decorated with
``@register_vision_tower("name")`` that builds it from its config section; the tower module is
imported only when a config asks for it (open_clip and transformers are heavy imports).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch

from .config_checks import choose
from .vision_encoder import VisionEncoder, check_feature_layer  # noqa: F401 (the interface, re-exported)

VisionFactory = Callable[[dict, torch.dtype, str], VisionEncoder]
_REGISTRY: Dict[str, VisionFactory] = {}


def register_vision_tower(name: str):
    def deco(fn: VisionFactory) -> VisionFactory:
        if name in _REGISTRY:
            raise ValueError(f"vision tower {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def vision_tower_names() -> list:
    return sorted(_REGISTRY)


def build_vision(cfg: Any, dtype: torch.dtype, where: str = "model.vision") -> VisionEncoder:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a mapping, got {cfg!r}")
    kind = choose(cfg.get("type"), _REGISTRY, f"{where}.type", "vision encoder type")
    return _REGISTRY[kind](cfg, dtype, where).to(dtype)


@register_vision_tower("open_clip")
def _open_clip(cfg: dict, dtype: torch.dtype, where: str) -> VisionEncoder:
    from .open_clip_tower import OpenClipVisionEncoder

    return OpenClipVisionEncoder.from_config(cfg, where)


@register_vision_tower("hf")
def _hugging_face(cfg: dict, dtype: torch.dtype, where: str) -> VisionEncoder:
    from .hf_vision_tower import HFVisionEncoder

    return HFVisionEncoder.from_config(cfg, dtype, where)
