"""Packed rows: several documents laid end to end in one row, each attending only to itself.

A packed row carries ``position_ids`` that restart at 0 for every document. We let transformers
isolate the documents from those position ids, the way its DataCollatorWithFlattening path does:
  - sdpa / eager: ``masking_utils.find_packed_sequence_indices`` turns the position ids into a
    block-diagonal causal mask, but ONLY when the 2-D ``attention_mask`` is None (given an all-ones
    mask, documents see each other). So the 2-D mask is dropped here.
  - flash-attention: the varlen kernel takes the document starts (cu_seqlens) from the position ids,
    but only for a batch of ONE row; so the rows are laid end to end as one row and split back after.
Why not our own 4-D block-diagonal mask: flash-attention cannot take one, and the position-id path is
exact (tests/test_packing_exact.py) and costs no extra B x T x T tensor for flash.
The pad tail at the end of a row is harmless: attention is causal, so no real token sees a later
position, and the pads (position 0 each) are one-token documents whose states are never read.
"""

from __future__ import annotations

from typing import Optional

import torch

# Model types whose decoder feeds position_ids into transformers' mask creation (checked by
# tests/test_packing_exact.py, which runs every entry); add a type only together with that test.
PACKABLE_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
# flex_attention and hub kernels are left out until tested.
PACKABLE_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
_ONE_ROW_ATTENTION = ("flash_attention_2", "flash_attention_3")  # varlen needs batch size 1
PACKABLE_KINDS = ("causal_lm", "composed")  # models whose LM runs through decoder_hidden_states


def packing_refusal(llm) -> Optional[str]:
    """Why this Hugging Face LM cannot isolate packed documents, or None when it can."""
    model_type = getattr(llm.config, "model_type", None)
    attn = getattr(llm.config, "_attn_implementation", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        return (f"model type {model_type!r} is not one packing can isolate documents for "
                f"({', '.join(PACKABLE_MODEL_TYPES)})")
    if attn not in PACKABLE_ATTENTION:
        return f"attn_implementation {attn!r} is not one packing supports ({', '.join(PACKABLE_ATTENTION)})"
    return None


def check_packable(model, where: str) -> None:
    """ValueError naming the model (``where``) when packed rows would let its documents attend to each other."""
    kind = getattr(model, "kind", None)
    if kind not in PACKABLE_KINDS:
        raise ValueError(f"{where}: data.pack: model type {kind!r} cannot take packed rows "
                         f"(supported: {', '.join(PACKABLE_KINDS)}); set data.pack: false")
    reason = packing_refusal(model.llm)
    if reason is not None:
        raise ValueError(f"{where}: data.pack: {reason}; set data.pack: false")


def packed_hidden_states(llm, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor],
                         position_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states of packed rows ``[B, T, H]`` (documents isolated by ``position_ids``)."""
    reason = packing_refusal(llm)
    if reason is not None:
        raise ValueError(f"packed rows (position_ids given): {reason}")
    if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("packed rows (position_ids given) must be right-padded: attention_mask has a 0 before a 1")
    B, T = inputs_embeds.shape[:2]
    one_row = llm.config._attn_implementation in _ONE_ROW_ATTENTION and B > 1
    if one_row:
        inputs_embeds, position_ids = inputs_embeds.reshape(1, B * T, -1), position_ids.reshape(1, B * T)
    out = llm.base_model(inputs_embeds=inputs_embeds, attention_mask=None, position_ids=position_ids,
                         use_cache=False).last_hidden_state
    return out.reshape(B, T, -1) if one_row else out
