"""Models: teacher and student behind one interface, built from config.

Contract (what the trainer and the data pipeline rely on)::

    from taid_vlm.models import build_model, load_model, check_vocab_compatible

    model = build_model(cfg, role="student")   # cfg: the YAML-shaped ``model`` dict (see below)
                                               # role="teacher": every parameter frozen, eval mode, and it
                                               # stays in eval mode after .train()
    model.input_spec      # taid_vlm.spec.InputSpec: tokenizer, image_transform, tokens_per_image,
                          # image_token_id, image_token (text-only: image_transform None, tokens_per_image 0)
    model.tokenizer       # the Hugging Face tokenizer
    model.hidden_states(input_ids, attention_mask, pixel_values=None, position_ids=None)  # [B, T, H]
                          # final hidden states = the lm_head input (after the LM's final norm)
    model.output_weight() # lm_head weight [V, H] (may be tied to the input embeddings; a bias is refused)
    model(input_ids, attention_mask, pixel_values=None, position_ids=None)  # logits [B, T, V]
                          # exactly hidden_states(...) @ output_weight().T
    model.vocab_size      # rows of the output weight (the full count under ZeRO-3 too)
    model.save_pretrained(dir[, state_dict=gathered])   # atomic; load_model(dir[, role]) -> same logits, bitwise
    check_vocab_compatible(teacher, student)  # ValueError naming both tokenizers and sizes unless the
                          # tokenizers agree; output embeddings padded larger on either side are fine

Inputs (dynamic-resolution HF families, ``input_spec.image_processor`` set): ``input_ids`` hold each image's
span as its HF processor writes it, and ``pixel_values`` is the dict of the processor's tensors for the batch
(``pixel_values``, ``image_grid_thw``, ``image_sizes``, ...; see hf_families.py, docs/bring_your_own_models.md).

Inputs (fixed size): ``input_ids`` already hold ``image_token_id`` repeated ``tokens_per_image`` times per image;
``pixel_values`` is ``[M, 3, H, W]``, every image of the batch in order of appearance, sample-major. Image
embeddings replace the placeholder embeddings in that order; a placeholder count other than
``M * tokens_per_image`` is a ValueError naming both counts. Pixels are cast to the parameter dtype inside
forward (DeepSpeed does not cast inputs).

Config (``type`` selects the model; unknown keys or values are a ValueError naming the key)::

    type: composed                   # composed | hf_vlm | causal_lm
    dtype: float32                   # float32 | bfloat16 | float16, for every component
    tokenizer: {builtin: tiny}       # or {path: /local/tokenizer_dir}
    image_token: "<image>"           # must already be one token of the tokenizer
    vision:                          # open_clip: {model: NAME} or {config: {CLIPVisionCfg fields}}
      {type: open_clip, config: {image_size: 32, patch_size: 8, width: 64, layers: 3, head_width: 32},
       pretrained: null, feature_layer: -2, drop_cls: true, preprocess: {mean: [...], std: [...]}}
      # or {type: hf, path: DIR} / {type: hf, config: {model_type: clip_vision_model, ...}},
      #    feature_layer, drop_cls, image_processor: {overrides or a full processor dict}
    projector: {type: mlp2x_gelu}    # linear | mlp2x_gelu | pixel_shuffle_mlp (factor: 2); see projectors.py
    llm: {config: {model_type: qwen2, hidden_size: 64, ...}, path: null,   # exactly one of config / path
          attn_implementation: sdpa, gradient_checkpointing: false}
    freeze: [vision]                 # composed: vision, projector, llm, embeddings (ignored by a teacher,
                                     # which freezes everything)

    type: causal_lm                  # keys: dtype, tokenizer, llm, freeze (llm, embeddings)
    type: hf_vlm                     # keys: path | config (model_type: llava or a family of hf_families.FAMILIES:
                                     # qwen2_vl, qwen2_5_vl, qwen3_vl, internvl, llava_next, llava_onevision,
                                     # idefics3, smolvlm, gemma3), tokenizer (default: path), processor
                                     # ({path: DIR}, default: path; built from the config otherwise),
                                     # image_processor (overrides), image_token, tokens_per_image (llava only,
                                     # derived), dtype, attn_implementation, gradient_checkpointing,
                                     # freeze (vision, projector, llm)
"""

from .base import DistillableModel
from .builder import MODEL_TYPES, build_model
from .io import load_model, save_model
from .projectors import PROJECTORS, projector_names
from .vocab_check import check_vocab_compatible

__all__ = [
    "DistillableModel",
    "MODEL_TYPES",
    "PROJECTORS",
    "build_model",
    "check_vocab_compatible",
    "load_model",
    "projector_names",
    "save_model",
]
