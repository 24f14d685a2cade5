"""Native Hugging Face VLMs (Llava-style ``*ForConditionalGeneration``) behind the common interface.

The HF model does its own vision -> projector -> splice; the adapter supplies the input spec (its image
processor, its image token and how many tokens an image expands to) and the final hidden states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from taid_vlm.spec import InputSpec

from .base import DistillableModel, check_image_count, distributed_world
from .config_checks import check_keys
from .hf_image_processing import HFImageTransform, build_image_processor, processor_dict
from .language_model import check_language_model, enable_checkpointing
from .tokenizer_loading import image_token_id as lookup_image_token_id
from .tokenizer_loading import load_tokenizer

KEYS = ("type", "path", "config", "tokenizer", "image_processor", "image_token", "tokens_per_image", "dtype",
        "attn_implementation", "gradient_checkpointing", "freeze")


def llava_tokens_per_image(config) -> int:
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


_TOKENS_PER_IMAGE = {"llava": llava_tokens_per_image}


class HFVisionLanguageModel(DistillableModel):
    kind = "hf_vlm"

    def __init__(self, hf_model, tokenizer, processor, image_token: str, tokens_per_image: int, config: dict):
        spec = InputSpec(tokenizer=tokenizer, image_transform=HFImageTransform(processor),
                         tokens_per_image=tokens_per_image, image_token_id=int(hf_model.config.image_token_id),
                         image_token=image_token)
        super().__init__(tokenizer, spec, config)
        self.hf = hf_model
        self.processor = processor
        self.image_token_id = int(hf_model.config.image_token_id)
        self.tokens_per_image = tokens_per_image
        self.run_vision_without_images: Optional[bool] = None  # see ComposedVLM: ZeRO-3 needs the same modules

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype, where: str = "model") -> "HFVisionLanguageModel":
        from transformers import AutoConfig, AutoModelForImageTextToText

        cfg = check_keys(cfg, KEYS, where)
        if (cfg.get("path") is None) == (cfg.get("config") is None):
            raise ValueError(f"{where}: set exactly one of 'path' (local folder) or 'config' (a config dict)")
        path = None if cfg.get("path") is None else Path(cfg["path"]).expanduser()
        if path is not None and not path.is_dir():
            raise ValueError(f"{where}.path: {str(path)!r} is not a local directory")
        tok_cfg = cfg.get("tokenizer") or ({"path": str(path)} if path is not None else None)
        if tok_cfg is None:
            raise ValueError(f"{where}.tokenizer: required when the model is built from 'config'")
        tokenizer = load_tokenizer(tok_cfg, f"{where}.tokenizer")
        image_token = cfg.get("image_token") or "<image>"
        tok_image_id = lookup_image_token_id(tokenizer, image_token, f"{where}.image_token")
        attn = cfg.get("attn_implementation") or "sdpa"

        if path is not None:
            hf = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
        else:
            conf = dict(cfg["config"])
            model_type = conf.pop("model_type", None)
            if model_type is None:
                raise ValueError(f"{where}.config.model_type: required (e.g. llava)")
            text = dict(conf.get("text_config") or {})
            text.setdefault("vocab_size", len(tokenizer))
            for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
                text.setdefault(key, getattr(tokenizer, key))
            conf["text_config"] = text
            conf.setdefault("image_token_index", tok_image_id)
            try:
                hf_cfg = AutoConfig.for_model(model_type, **conf)
            except ValueError as e:
                raise ValueError(f"{where}.config.model_type: {e}") from None
            hf = AutoModelForImageTextToText.from_config(hf_cfg, dtype=dtype, attn_implementation=attn)
        if int(hf.config.image_token_id) != tok_image_id:
            raise ValueError(f"{where}: the model's image_token_id {hf.config.image_token_id} is not the "
                             f"tokenizer's id {tok_image_id} for {image_token!r}")
        check_language_model(hf, tokenizer, where)
        hf.config.use_cache = False
        if cfg.get("gradient_checkpointing"):
            enable_checkpointing(hf)

        tpi = cfg.get("tokens_per_image")
        if tpi is None:
            if hf.config.model_type not in _TOKENS_PER_IMAGE:
                raise ValueError(f"{where}.tokens_per_image: required for model type {hf.config.model_type!r} "
                                 f"(known: {sorted(_TOKENS_PER_IMAGE)})")
            tpi = _TOKENS_PER_IMAGE[hf.config.model_type](hf.config)
        vc = hf.config.vision_config
        processor = build_image_processor(str(path) if path is not None else None, cfg.get("image_processor"),
                                          vc.model_type, vc.image_size, f"{where}.image_processor")
        return cls(hf, tokenizer, processor, image_token, int(tpi), cfg)

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None):
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        check_image_count(input_ids, self.image_token_id, self.tokens_per_image, n_images)
        if n_images:
            pixel_values = pixel_values.to(self.hf.dtype)
        else:
            pixel_values = None
        out = self.hf.base_model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False).last_hidden_state
        if pixel_values is None and (self.run_vision_without_images or
                                     (self.run_vision_without_images is None and distributed_world() > 1)):
            size = self.hf.config.vision_config.image_size
            blank = torch.zeros(1, 3, size, size, device=out.device, dtype=self.hf.dtype)
            feats = self.hf.base_model.get_image_features(pixel_values=blank).pooler_output
            out = out + 0.0 * sum(f.sum() for f in feats).to(out.dtype)
        return out

    def output_embeddings(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def components(self) -> Dict[str, Iterable[nn.Parameter]]:
        base = self.hf.base_model
        groups = {}
        for name, attr in (("vision", "vision_tower"), ("projector", "multi_modal_projector")):
            module = getattr(base, attr, None)
            if module is not None:
                groups[name] = list(module.parameters())
        lm = getattr(base, "language_model", None)
        if lm is not None:
            groups["llm"] = list(lm.parameters()) + list(self.hf.get_output_embeddings().parameters())
        return groups

    def export_config(self) -> dict:
        cfg = dict(self.model_config)
        cfg.pop("config", None)
        cfg.update(path="hf_model", tokenizer={"path": "hf_model"}, image_processor=processor_dict(self.processor),
                   tokens_per_image=self.tokens_per_image)
        return cfg

    def write_weights(self, directory: Path, state_dict: Optional[dict]) -> None:
        hf_state = None
        if state_dict is not None:
            hf_state = {k[len("hf."):]: v for k, v in state_dict.items() if k.startswith("hf.")}
        self.hf.save_pretrained(str(directory / "hf_model"), state_dict=hf_state)
        self.tokenizer.save_pretrained(str(directory / "hf_model"))
        self.processor.save_pretrained(str(directory / "hf_model"))
