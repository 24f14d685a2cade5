"""Hugging Face vision towers (CLIP, SigLIP) from a local folder or a config dict.

Features are ``hidden_states[feature_layer]`` of the encoder, as LLaVA takes them (-2 by default: the
penultimate layer, before the final norm); CLIP's CLS token is dropped by default.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config_checks import check_keys, choose
from .folder_checks import check_model_folder, reading_folder
from .hf_image_processing import HFImageTransform, build_image_processor, processor_dict
from .vision_encoder import VisionEncoder, check_feature_layer

KEYS = ("type", "path", "config", "feature_layer", "drop_cls", "image_processor")
_VISION_CLASSES = {
    "clip_vision_model": "CLIPVisionModel",
    "clip": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip": "SiglipVisionModel",
}
_HAS_CLS = {"clip_vision_model", "clip"}


class HFVisionEncoder(VisionEncoder):
    def __init__(self, model, model_type: str, layer: int, drop_cls: bool, processor):
        super().__init__()
        self.model = model
        self.model_type = model_type
        cfg = model.config
        self.layer = layer  # index into hidden_states: 0 = embeddings, k = output of block k-1
        self.has_cls = model_type in _HAS_CLS
        self.drop_cls = drop_cls
        self.hidden_size = cfg.hidden_size
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)
        self.image_size = (cfg.image_size, cfg.image_size)
        self.num_tokens = side * side + (1 if self.has_cls and not drop_cls else 0)
        self.processor = processor
        self.image_transform = HFImageTransform(processor)

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype, where: str) -> "HFVisionEncoder":
        import transformers
        from transformers import AutoConfig

        cfg = check_keys(cfg, KEYS, where)
        if (cfg.get("path") is None) == (cfg.get("config") is None):
            raise ValueError(f"{where}: set exactly one of 'path' (local folder) or 'config' (a config dict)")
        if cfg.get("path") is not None:
            path = Path(cfg["path"]).expanduser()
            if not path.is_dir():
                raise ValueError(f"{where}.path: {str(path)!r} is not a local directory")
            model_type = check_model_folder(path, f"{where}.path")
            choose(model_type, _VISION_CLASSES, f"{where}.path", "vision model type")
            # a full CLIP/SigLIP checkpoint loads into the vision-only class: the text half is skipped
            with reading_folder(f"{where}.path", path):
                model = getattr(transformers, _VISION_CLASSES[model_type]).from_pretrained(str(path), dtype=dtype)
        else:
            conf = dict(cfg["config"])
            model_type = choose(conf.pop("model_type", None), _VISION_CLASSES, f"{where}.config.model_type",
                                "vision model type")
            hf_cfg = AutoConfig.for_model(model_type, **conf)
            model = getattr(transformers, _VISION_CLASSES[model_type])(hf_cfg)
        model_type = model.config.model_type
        n_layers = model.config.num_hidden_layers
        block = check_feature_layer(cfg.get("feature_layer", -2), n_layers, f"{where}.feature_layer")
        drop_cls = bool(cfg.get("drop_cls", True))  # no effect on SigLIP, which has no CLS token
        processor = build_image_processor(cfg.get("path"), cfg.get("image_processor"), model_type,
                                          model.config.image_size, f"{where}.image_processor")
        return cls(model, model_type, block + 1, drop_cls, processor)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        tokens = out.hidden_states[self.layer]
        return tokens[:, 1:] if self.has_cls and self.drop_cls else tokens

    def unused_parameters(self):
        used_blocks = self.layer  # hidden_states[k] needs blocks 0..k-1
        out = []
        for name, p in self.model.named_parameters():
            parts = name.split(".")
            if "layers" in parts:
                idx = int(parts[parts.index("layers") + 1])
                if idx >= used_blocks:
                    out.append(p)
            elif "post_layernorm" in parts or "head" in parts:
                out.append(p)
        return out

    def export_config(self) -> dict:
        conf = self.model.config.to_dict()
        conf = {k: v for k, v in conf.items() if k not in ("architectures", "transformers_version", "dtype",
                                                          "torch_dtype", "_name_or_path")}
        return {"type": "hf", "config": conf, "feature_layer": self.layer - 1, "drop_cls": self.drop_cls,
                "image_processor": processor_dict(self.processor)}
