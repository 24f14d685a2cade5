"""``build_model(cfg, role)``: teacher or student from the YAML-shaped ``model`` section of a recipe."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from .base import ROLES, DistillableModel
from .config_checks import check_keys, choose, dtype_name, resolve_dtype

_COMPOSED_KEYS = ("type", "dtype", "tokenizer", "image_token", "vision", "projector", "llm", "freeze", "lora")
_CAUSAL_KEYS = ("type", "dtype", "tokenizer", "llm", "freeze", "lora")


def build_model(cfg: Mapping[str, Any], role: str = "student", where: str = "model") -> DistillableModel:
    """Build a model; ``role="teacher"`` freezes every parameter and pins eval mode."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(cfg).__name__}")
    choose(role, ROLES, "role", "role")
    cfg = copy.deepcopy(dict(cfg))
    kind = choose(cfg.get("type"), _BUILDERS, f"{where}.type", "model type")
    dtype = resolve_dtype(cfg.get("dtype", "float32"), f"{where}.dtype")
    cfg["dtype"] = dtype_name(dtype)

    model = _BUILDERS[kind](cfg, dtype, where)
    model.freeze(cfg.get("freeze") or [], f"{where}.freeze")
    model.set_role(role)
    if cfg.get("lora") is not None:
        from .lora import apply_lora

        apply_lora(model, cfg["lora"], f"{where}.lora")
    model.eval()  # deterministic until the trainer calls .train() (a teacher ignores it)
    return model


def _build_composed(cfg: dict, dtype, where: str) -> DistillableModel:
    from .composed import ComposedVLM
    from .language_model import build_language_model
    from .projectors import build_projector
    from .folder_checks import load_tokenizer_checked
    from .tokenizer_loading import image_token_id
    from .vision import build_vision

    check_keys(cfg, _COMPOSED_KEYS, where, required=("tokenizer", "vision", "projector", "llm"))
    tokenizer = load_tokenizer_checked(cfg["tokenizer"], f"{where}.tokenizer")
    image_token = cfg.get("image_token") or "<image>"
    tid = image_token_id(tokenizer, image_token, f"{where}.image_token")
    vision = build_vision(cfg["vision"], dtype, f"{where}.vision")
    for p in vision.unused_parameters():
        p.requires_grad_(False)
    llm = build_language_model(cfg["llm"], tokenizer, dtype, f"{where}.llm")
    projector = build_projector(cfg["projector"], vision.hidden_size, llm.get_input_embeddings().embedding_dim,
                                vision.grid, vision.num_tokens, f"{where}.projector").to(dtype)
    return ComposedVLM(vision, projector, llm, tokenizer, image_token, tid, cfg)


def _build_causal_lm(cfg: dict, dtype, where: str) -> DistillableModel:
    from .language_model import build_language_model
    from .folder_checks import load_tokenizer_checked
    from .text_only import CausalLM

    check_keys(cfg, _CAUSAL_KEYS, where, required=("tokenizer", "llm"))
    tokenizer = load_tokenizer_checked(cfg["tokenizer"], f"{where}.tokenizer")
    llm = build_language_model(cfg["llm"], tokenizer, dtype, f"{where}.llm")
    return CausalLM(llm, tokenizer, cfg)


def _build_hf_vlm(cfg: dict, dtype, where: str) -> DistillableModel:
    from .hf_vlm_adapter import HFVisionLanguageModel

    return HFVisionLanguageModel.from_config(cfg, dtype, where)


# config name (model.type) -> the function that builds it; a native Hugging Face VLM family is an entry of
# hf_families.FAMILIES under hf_vlm, not a type here
_BUILDERS = {"composed": _build_composed, "hf_vlm": _build_hf_vlm, "causal_lm": _build_causal_lm}
MODEL_TYPES = tuple(_BUILDERS)
