"""Hugging Face image processors as plain ``PIL -> [3, H, W]`` transforms, built offline.

A processor comes from a local folder (``preprocessor_config.json``) or from a dict: either a full
processor dict (with ``image_processor_type``, as saved by this package) or overrides on top of the
default processor class for the vision model type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

_DEFAULT_PROCESSOR = {
    "clip_vision_model": "CLIPImageProcessor",
    "clip": "CLIPImageProcessor",
    "siglip_vision_model": "SiglipImageProcessor",
    "siglip": "SiglipImageProcessor",
}


class HFImageTransform:
    """Picklable callable (dataloader workers) around an image processor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImageTransform({type(self.processor).__name__})"


def _processor_class(name: str, where: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"{where}: unknown image processor type {name!r}")
    return cls


def build_image_processor(path: Optional[str], overrides: Any, vision_model_type: str, image_size: int,
                          where: str):
    overrides = dict(overrides or {})
    if overrides.get("image_processor_type"):
        return _processor_class(overrides["image_processor_type"], where).from_dict(overrides)
    if path is not None and (Path(path) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(path))
    else:
        if vision_model_type not in _DEFAULT_PROCESSOR:
            raise ValueError(f"{where}: no default image processor for vision model type {vision_model_type!r}; "
                             "give a full processor dict with 'image_processor_type'")
        cls = _processor_class(_DEFAULT_PROCESSOR[vision_model_type], where)
        if cls.__name__.startswith("CLIP"):
            processor = cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
        else:
            processor = cls(size={"height": image_size, "width": image_size})
    if overrides:
        processor = type(processor).from_dict({**processor_dict(processor), **overrides})
    return processor


def processor_dict(processor) -> dict:
    """JSON-safe dict (enums and tuples flattened) that ``build_image_processor`` accepts back."""
    return json.loads(processor.to_json_string())
