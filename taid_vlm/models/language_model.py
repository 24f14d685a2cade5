"""Any Hugging Face causal LM, from a local folder or built from a config dict (tiny Qwen2/Llama in tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .config_checks import check_keys
from .folder_checks import check_model_folder, reading_folder

KEYS = ("config", "path", "attn_implementation", "gradient_checkpointing")

# Output transforms after lm_head: the trainer applies lm_head itself (hidden @ W.T), so a model that
# scales or soft-caps its logits would be distilled against the wrong distribution.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def build_language_model(cfg: Any, tokenizer, dtype: torch.dtype, where: str = "model.llm"):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = check_keys(cfg, KEYS, where)
    if (cfg.get("path") is None) == (cfg.get("config") is None):
        raise ValueError(f"{where}: set exactly one of 'path' (local folder) or 'config' (a config dict)")
    attn = cfg.get("attn_implementation") or "sdpa"
    if cfg.get("path") is not None:
        path = Path(cfg["path"]).expanduser()
        if not path.is_dir():
            raise ValueError(f"{where}.path: {str(path)!r} is not a local directory")
        check_model_folder(path, f"{where}.path")
        with reading_folder(f"{where}.path", path):
            llm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
    else:
        conf = dict(cfg["config"])
        model_type = conf.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{where}.config.model_type: required (e.g. qwen2, llama)")
        conf.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            conf.setdefault(key, getattr(tokenizer, key))
        try:
            hf_cfg = AutoConfig.for_model(model_type, **conf)
        except ValueError as e:
            raise ValueError(f"{where}.config.model_type: {e}") from None
        llm = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=attn)
    check_language_model(llm, tokenizer, where)
    if cfg.get("gradient_checkpointing"):
        enable_checkpointing(llm)
    llm.config.use_cache = False
    return llm


def enable_checkpointing(model) -> None:
    """Activation checkpointing; transformers >= 5.2x renamed the switch, the GPU image (5.17) has the old one."""
    kwargs = {"use_reentrant": False}  # reentrant checkpointing drops gradients when the inputs need none
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def check_language_model(llm, tokenizer, where: str) -> None:
    head = llm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{where}: {type(llm).__name__} has no output embedding (lm_head)")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{where}: lm_head has a bias; the chunked loss uses hidden @ W.T only (not supported)")
    text_cfg = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(text_cfg, attr, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            raise ValueError(f"{where}: {type(llm).__name__} applies {attr}={value} to its logits; not supported "
                             "(the trainer computes logits as hidden @ lm_head.T)")
    rows = head.weight.shape[0]
    if rows < len(tokenizer):
        raise ValueError(f"{where}: output embedding has {rows} rows but the tokenizer has {len(tokenizer)} "
                         "tokens; resize the model's embeddings")


def decoder_hidden_states(llm, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor],
                          position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Final hidden states (after the final norm) of a causal LM, i.e. the input of its lm_head.
    ``position_ids`` given means packed rows: each document is isolated (packing.py)."""
    if position_ids is not None:
        from .packing import packed_hidden_states

        return packed_hidden_states(llm, inputs_embeds, attention_mask, position_ids)
    out = llm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
    return out.last_hidden_state
