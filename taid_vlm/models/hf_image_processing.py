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

        from .folder_checks import reading_folder

        with reading_folder(where, path):
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


# processor outputs that are per token (the data side makes them), not per image
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


class ProcessorImageInputs:
    """The images of one sample -> ``taid_vlm.spec.ImageInputs``, through a family's own HF processor.

    The processor sees exactly what it would see inside a conversation: the sample's images together
    (LLaVA-OneVision tiles only single-image samples) and one image prompt per image. The prompts are
    joined by the eos token, a special token that no span contains, and the ids are cut there; so each
    span is what the processor writes for that image (its text edges, e.g. Gemma 3's blank lines, are
    tokenized on their own). ``batched_keys`` lose the processor's leading batch axis of 1.
    Picklable (DataLoader workers).
    """

    def __init__(self, processor, image_prompt: str, batched_keys=()):
        self.processor = processor
        self.prompt = image_prompt.format(image=processor.image_token)
        tok = processor.tokenizer
        self.sep, self.sep_id = tok.eos_token, tok.eos_token_id
        self.batched_keys = tuple(batched_keys)

    def __call__(self, images):
        from taid_vlm.spec import ImageInputs

        images = list(images)
        if not images:
            return ImageInputs([], {})
        text = self.sep.join([self.prompt] * len(images))
        out = self.processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
        ids = out["input_ids"][0].tolist()
        spans, cur = [], []
        for t in ids + [self.sep_id]:
            if t == self.sep_id:
                spans.append(cur)
                cur = []
            else:
                cur.append(t)
        if len(spans) != len(images):
            raise RuntimeError(f"{type(self.processor).__name__}: {len(spans)} image spans for {len(images)} images")
        tensors = {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        for k in self.batched_keys:
            if k in tensors:
                tensors[k] = tensors[k][0]
        return ImageInputs(spans, tensors)

    def __repr__(self) -> str:
        return f"ProcessorImageInputs({type(self.processor).__name__}, {self.prompt!r})"
