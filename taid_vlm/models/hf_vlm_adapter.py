"""Native Hugging Face VLMs (``*ForConditionalGeneration``) behind the common interface.

The HF model does its own vision -> projector -> splice; the adapter supplies the input spec and the
final hidden states. Two kinds, one class each below HFVisionLanguageModel (what they share):

- ``llava`` (FixedSizeVLM): a fixed-size tower; the spec is an image transform + ``tokens_per_image``;
- the dynamic-resolution families of ``hf_families.FAMILIES`` (DynamicResolutionVLM) (Qwen2/2.5/3-VL, InternVL,
  LLaVA-NeXT/OneVision, Idefics3/SmolVLM, Gemma 3, Mistral 3): the spec carries the family's own HF
  processor (``ProcessorImageInputs``; for Qwen its exact fast path ``QwenImageInputs``), which decides
  per image the token span and pixel inputs; ``pixel_values``
  then arrives as the dict of those inputs (pixel_values, image_grid_thw, image_sizes, ...).

The stock HF model object is ``self.hf`` (save it with ``self.hf.save_pretrained``), its processor
``self.processor``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from taid_vlm.spec import InputSpec

from .base import DistillableModel, check_image_count, distributed_world
from .config_checks import check_keys
from .hf_families import FAMILIES, family
from .hf_image_processing import HFImageTransform, build_image_processor, processor_dict
from .hf_qwen_image_inputs import image_inputs_for
from .language_model import check_language_model, enable_checkpointing
from .folder_checks import (ModelFolderError, check_model_folder, check_processor_files, load_tokenizer_checked,
                            reading_folder)
from .tokenizer_loading import image_token_id as lookup_image_token_id

KEYS = ("type", "path", "config", "tokenizer", "image_processor", "image_token", "tokens_per_image", "dtype",
        "attn_implementation", "gradient_checkpointing", "freeze", "processor", "lora")
SUPPORTED = ("llava",) + tuple(sorted(FAMILIES))


def llava_tokens_per_image(config) -> int:
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


_TOKENS_PER_IMAGE = {"llava": llava_tokens_per_image}


class HFVisionLanguageModel(DistillableModel):
    """What both kinds share: the stock HF model (``self.hf``), its tokenizer and processor, the build
    from a config (which picks the kind by the model type), the output head and the export of weights."""
    kind = "hf_vlm"
    family = None  # the hf_families.FAMILIES entry of a dynamic-resolution model

    def __init__(self, hf_model, tokenizer, processor, spec: InputSpec, config: dict):
        super().__init__(tokenizer, spec, config)
        self.hf = hf_model
        self.processor = processor
        self.image_token_id = int(hf_model.config.image_token_id)
        self.run_vision_without_images: Optional[bool] = None  # see ComposedVLM: ZeRO-3 needs the same modules
        self._accepts = set(inspect.signature(hf_model.base_model.forward).parameters)

    @classmethod
    def from_config(cls, cfg: dict, dtype: torch.dtype, where: str = "model") -> "HFVisionLanguageModel":
        cfg = check_keys(cfg, KEYS, where)
        if (cfg.get("path") is None) == (cfg.get("config") is None):
            raise ValueError(f"{where}: set exactly one of 'path' (local folder) or 'config' (a config dict)")
        path = None if cfg.get("path") is None else Path(cfg["path"]).expanduser()
        if path is not None and not path.is_dir():
            raise ValueError(f"{where}.path: {str(path)!r} is not a local directory")
        tok_cfg = cfg.get("tokenizer") or ({"path": str(path)} if path is not None else None)
        if tok_cfg is None:
            raise ValueError(f"{where}.tokenizer: required when the model is built from 'config'")
        attn = cfg.get("attn_implementation") or "sdpa"
        model_type, fam = _model_type(cfg, path, where)  # the folder first: what else it must hold depends on it
        tokenizer = load_tokenizer_checked(tok_cfg, f"{where}.tokenizer")
        if fam is not None:
            return DynamicResolutionVLM.build(cfg, path, model_type, fam, tokenizer, dtype, attn, where)
        return FixedSizeVLM.build(cfg, path, model_type, tokenizer, dtype, attn, where)

    def _vision_without_images(self) -> bool:
        return bool(self.run_vision_without_images or
                    (self.run_vision_without_images is None and distributed_world() > 1))

    def output_embeddings(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def hf_config_beside_tokenizer(self):
        return self.hf.config

    def _export_paths(self) -> dict:
        cfg = dict(self.model_config)
        cfg.pop("config", None)
        cfg.update(path="hf_model", tokenizer={"path": "hf_model"})
        return cfg

    def write_weights(self, directory: Path, state_dict: Optional[dict]) -> None:
        hf_state = None
        if state_dict is not None:
            hf_state = {k[len("hf."):]: v for k, v in state_dict.items() if k.startswith("hf.")}
        self.hf.save_pretrained(str(directory / "hf_model"), state_dict=hf_state)
        self.tokenizer.save_pretrained(str(directory / "hf_model"))
        self.processor.save_pretrained(str(directory / "hf_model"))


class FixedSizeVLM(HFVisionLanguageModel):
    """``llava``: a fixed-size tower; the spec is an image transform + ``tokens_per_image``."""

    def __init__(self, hf_model, tokenizer, processor, image_token: str, tokens_per_image: int, config: dict):
        spec = InputSpec(tokenizer=tokenizer, image_transform=HFImageTransform(processor),
                         tokens_per_image=tokens_per_image, image_token_id=int(hf_model.config.image_token_id),
                         image_token=image_token)
        super().__init__(hf_model, tokenizer, processor, spec, config)
        self.tokens_per_image = tokens_per_image

    @classmethod
    def build(cls, cfg, path, model_type, tokenizer, dtype, attn, where) -> "FixedSizeVLM":
        from transformers import AutoModelForImageTextToText

        image_token = cfg.get("image_token") or "<image>"
        tok_image_id = lookup_image_token_id(tokenizer, image_token, f"{where}.image_token")

        if path is not None:
            with reading_folder(f"{where}.path", path):
                hf = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
        else:
            conf = _text_config_from_tokenizer(cfg["config"], tokenizer)
            conf.setdefault("image_token_index", tok_image_id)
            hf = _from_config(model_type, conf, dtype, attn, where)
        if int(hf.config.image_token_id) != tok_image_id:
            raise ValueError(f"{where}: the model's image_token_id {hf.config.image_token_id} is not the "
                             f"tokenizer's id {tok_image_id} for {image_token!r}")
        check_language_model(hf, tokenizer, where)
        hf.config.use_cache = False
        if cfg.get("gradient_checkpointing"):
            enable_checkpointing(hf)

        tpi = cfg.get("tokens_per_image")
        if tpi is None:
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
        if pixel_values is None and self._vision_without_images():
            size = self.hf.config.vision_config.image_size
            blank = torch.zeros(1, 3, size, size, device=out.device, dtype=self.hf.dtype)
            out = out + 0.0 * _total(self.hf.base_model.get_image_features(pixel_values=blank)).to(out.dtype)
        return out

    def generate_tokens(self, input_ids, attention_mask, pixel_values=None, **generate_kwargs):
        images = {"pixel_values": pixel_values.to(self.hf.dtype)} if pixel_values is not None else {}
        out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, **images, **generate_kwargs)
        return out[:, input_ids.shape[1]:]

    def components(self) -> Dict[str, Iterable[nn.Parameter]]:
        base = self.hf.base_model
        head = list(self.hf.get_output_embeddings().parameters())
        groups = {}
        for name, attr in (("vision", "vision_tower"), ("projector", "multi_modal_projector")):
            module = getattr(base, attr, None)
            if module is not None:
                groups[name] = list(module.parameters())
        lm = getattr(base, "language_model", None)
        if lm is not None:
            groups["llm"] = list(lm.parameters()) + head
        return groups

    def export_config(self) -> dict:
        return {**self._export_paths(), "image_processor": processor_dict(self.processor),
                "tokens_per_image": self.tokens_per_image}


class DynamicResolutionVLM(HFVisionLanguageModel):
    """A family of ``hf_families.FAMILIES``: the spec carries the family's own HF processor, which decides
    per image the token span and pixel inputs; ``pixel_values`` arrives as the dict of those inputs."""

    def __init__(self, hf_model, tokenizer, processor, image_token: str, fam, config: dict):
        spec = InputSpec(tokenizer=tokenizer, image_token=image_token,
                         image_token_id=int(tokenizer.convert_tokens_to_ids(image_token)),
                         chat_template=getattr(processor, "chat_template", None),
                         image_processor=image_inputs_for(processor, fam.image_prompt, fam.batched_keys),
                         image_prompt=fam.image_prompt.format(image=image_token))
        super().__init__(hf_model, tokenizer, processor, spec, config)
        self.family = fam

    @classmethod
    def build(cls, cfg, path, model_type, fam, tokenizer, dtype, attn, where) -> "DynamicResolutionVLM":
        """A dynamic-resolution family: the model, and its processor from a folder or built for its config."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if cfg.get("tokens_per_image") is not None:
            raise ValueError(f"{where}.tokens_per_image: not used by {model_type!r}: its processor decides per image")
        if path is not None:
            with reading_folder(f"{where}.path", path):
                hf = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
        else:
            conf = _text_config_from_tokenizer(cfg["config"], tokenizer)
            for key, token in fam.token_ids.items():
                conf.setdefault(key, lookup_image_token_id(tokenizer, token, f"{where}.tokenizer ({key})"))
            hf = _from_config(model_type, conf, dtype, attn, where)
        check_language_model(hf, tokenizer, where)
        hf.config.use_cache = False
        if cfg.get("gradient_checkpointing"):
            enable_checkpointing(hf)
        proc_cfg = check_keys(cfg.get("processor") or {}, ("path",), f"{where}.processor")
        proc_path = proc_cfg.get("path") or (str(path) if path is not None else None)
        if proc_path is not None:
            proc_where = f"{where}.processor.path" if proc_cfg.get("path") else f"{where}.path"
            proc_dir = Path(proc_path).expanduser()
            if not proc_dir.is_dir():
                raise ValueError(f"{proc_where}: {proc_path!r} is not a local directory")
            check_processor_files(proc_dir, proc_where)
            with reading_folder(proc_where, proc_dir):
                processor = AutoProcessor.from_pretrained(str(proc_dir))
            if cfg.get("image_processor"):
                ip = processor.image_processor
                processor.image_processor = type(ip).from_dict({**processor_dict(ip), **cfg["image_processor"]})
        else:
            overrides = dict(cfg.get("image_processor") or {})
            overrides.setdefault("processor", {}).setdefault("chat_template", tokenizer.chat_template)
            try:
                processor = fam.build_processor(tokenizer, hf.config, overrides)
            except (ImportError, TypeError, ValueError) as e:
                raise ValueError(f"{where}.image_processor: cannot build the {model_type} processor: {e}") from None
        image_token = cfg.get("image_token") or processor.image_token
        lookup_image_token_id(tokenizer, image_token, f"{where}.image_token")
        return cls(hf, tokenizer, processor, image_token, fam, cfg)

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None):
        image_inputs = pixel_values  # the dict of the processor's tensors
        if image_inputs is not None and not isinstance(image_inputs, Mapping):
            raise ValueError(f"{self.hf.config.model_type}: pixel_values must be the dict of the processor's "
                             f"tensors (taid_vlm.data collate), got {type(image_inputs).__name__}")
        kwargs = self.model_image_inputs(image_inputs or {}, input_ids)
        out = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False, **kwargs).last_hidden_state
        if not image_inputs and self._vision_without_images():
            # ZeRO-3: every rank must run the same modules (partitioned weights are gathered collectively)
            from PIL import Image

            blank = self.input_spec.image_processor([Image.new("RGB", (32, 32))]).tensors
            blank = {k: v.to(out.device) for k, v in blank.items()}
            feats = self.hf.base_model.get_image_features(**{
                k: v for k, v in self.model_image_inputs(blank, input_ids[:0]).items()
                if k in inspect.signature(self.hf.base_model.get_image_features).parameters})
            if hasattr(feats, "pooler_output"):  # only what reaches the LM: the same parameters get gradients
                feats = [feats.pooler_output, getattr(feats, "deepstack_features", None)]
            out = out + 0.0 * _total(feats).to(out.dtype)
        return out

    def model_image_inputs(self, image_inputs: Mapping, input_ids: torch.Tensor) -> dict:
        """Batch dict of processor tensors -> the keyword arguments of the HF model's forward."""
        kwargs = {}
        for key, value in image_inputs.items():
            if key not in self._accepts:
                continue  # e.g. num_patches, which the processor uses for the spans only
            if value.is_floating_point():
                value = value.to(self.hf.dtype)  # DeepSpeed does not cast inputs
            if key in self.family.batched_keys:
                value = value.unsqueeze(0)
            kwargs[key] = value
        if self.family.type_ids and self.family.type_ids in self._accepts:
            kwargs[self.family.type_ids] = (input_ids == self.image_token_id).long()
        return kwargs

    def generate_tokens(self, input_ids, attention_mask, pixel_values=None, **generate_kwargs):
        images = self.model_image_inputs(pixel_values or {}, input_ids)  # the processor's tensors, as forward
        out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, **images, **generate_kwargs)
        return out[:, input_ids.shape[1]:]

    def components(self) -> Dict[str, Iterable[nn.Parameter]]:
        base = self.hf.base_model
        head = list(self.hf.get_output_embeddings().parameters())
        # dynamic families: by parameter name (Qwen's projector, the merger, lives inside ``visual``)
        groups = {"vision": [], "projector": [], "llm": []}
        vision, projector = self.family.vision + ".", tuple(p + "." for p in self.family.projector)
        head_ids = {id(p) for p in head}
        for name, p in base.named_parameters():
            if id(p) in head_ids:
                continue
            if name.startswith(projector) or name in self.family.projector:
                groups["projector"].append(p)
            elif name.startswith(vision):
                groups["vision"].append(p)
            else:
                groups["llm"].append(p)
        groups["llm"] += head
        return groups

    def export_config(self) -> dict:
        cfg = self._export_paths()
        cfg.pop("image_processor", None)
        return {**cfg, "processor": None}


def _total(features) -> torch.Tensor:
    """Sum of every tensor in what ``get_image_features`` returns (a tensor, tuple, list or model output)."""
    if isinstance(features, torch.Tensor):
        return features.float().sum()
    if hasattr(features, "to_tuple"):
        features = features.to_tuple()
    return sum((_total(f) for f in features if f is not None), torch.zeros(()))


def _text_config_from_tokenizer(config: dict, tokenizer) -> dict:
    conf = dict(config)
    conf.pop("model_type", None)
    text = dict(conf.get("text_config") or {})
    text.setdefault("vocab_size", len(tokenizer))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        text.setdefault(key, getattr(tokenizer, key))
    conf["text_config"] = text
    return conf


def _model_type(cfg: dict, path: Optional[Path], where: str):
    """(model_type, its dynamic family or None for llava), from the folder's config.json (checked with its
    weights) or from ``config``; an unsupported type names the key it came from (and the file)."""
    if path is not None:
        model_type, key = check_model_folder(path, f"{where}.path"), f"{where}.path"
    else:
        model_type, key = (cfg["config"] or {}).get("model_type"), f"{where}.config.model_type"
        if model_type is None:
            raise ValueError(f"{key}: required (one of {list(SUPPORTED)})")
    if model_type == "llava":
        return model_type, None
    try:
        return model_type, family(model_type, key)
    except ValueError as e:
        if path is None:
            raise
        raise ModelFolderError(str(e), str(path / "config.json")) from None


def _from_config(model_type: str, conf: dict, dtype, attn: str, where: str):
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        hf_cfg = AutoConfig.for_model(model_type, **conf)
    except ValueError as e:
        raise ValueError(f"{where}.config.model_type: {e}") from None
    return AutoModelForImageTextToText.from_config(hf_cfg, dtype=dtype, attn_implementation=attn)
