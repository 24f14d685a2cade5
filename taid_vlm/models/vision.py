"""Vision towers by name, like the projectors: ``build_vision({type: open_clip, ...}, dtype)``.

A new tower family is a VisionEncoder subclass (vision_encoder.py), one function that builds it from its
config section, and its line in ``VISION_TOWERS`` (the name a config's ``vision.type`` gives) at the end of
this file; the tower module is imported only when a config asks for it (open_clip and transformers are
heavy imports).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch

from .config_checks import choose
from .vision_encoder import VisionEncoder, check_feature_layer  # noqa: F401 (the interface, re-exported)

VisionFactory = Callable[[dict, torch.dtype, str], VisionEncoder]


def vision_tower_names() -> list:
    return sorted(VISION_TOWERS)


def build_vision(cfg: Any, dtype: torch.dtype, where: str = "model.vision") -> VisionEncoder:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a mapping, got {cfg!r}")
    kind = choose(cfg.get("type"), VISION_TOWERS, f"{where}.type", "vision encoder type")
    return VISION_TOWERS[kind](cfg, dtype, where).to(dtype)


def _open_clip(cfg: dict, dtype: torch.dtype, where: str) -> VisionEncoder:
    from .open_clip_tower import OpenClipVisionEncoder

    return OpenClipVisionEncoder.from_config(cfg, where)


def _hugging_face(cfg: dict, dtype: torch.dtype, where: str) -> VisionEncoder:
    from .hf_vision_tower import HFVisionEncoder

    return HFVisionEncoder.from_config(cfg, dtype, where)


# config name (vision.type) -> the function that builds it
VISION_TOWERS: Dict[str, VisionFactory] = {
    "open_clip": _open_clip,
    "hf": _hugging_face,
}
