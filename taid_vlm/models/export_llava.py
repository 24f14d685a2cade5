"""A composed student as a stock Llava model: ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

The mapping is exact (same arithmetic, same weights; tests/test_export_hf.py checks the logits to 1e-5):

  vision tower (HF CLIP / SigLIP)   -> ``model.vision_tower``: the same class with the same weights;
                                       features ``hidden_states[k]`` -> ``vision_feature_layer = k - (L + 1)``
                                       (negative, as LLaVA writes it: -2 is the penultimate block)
  drop_cls (CLIP)                   -> ``vision_feature_select_strategy: default`` (drops token 0);
                                       SigLIP (no CLS) or a kept CLS -> ``full``
  projector ``mlp2x_gelu``          -> ``multi_modal_projector``: linear_1, GELU (erf, as ``nn.GELU()``), linear_2
  projector ``linear``              -> Llava has no single-linear projector: linear_1 = the linear,
                                       ``projector_hidden_act: linear`` (identity), linear_2 = identity matrix
                                       with zero bias (exact: x @ I adds only zeros), at the cost of H*H weights
  LM (HF causal LM)                 -> ``model.language_model`` (its base model) + ``lm_head``
  image processor                   -> the tower's own HF image processor, the one training used
  tokenizer, image token, chat template (the one training rendered with; list contents such as
  ``{"type": "image"}`` are accepted too, see accept_content_lists) -> ``LlavaProcessor``

Anything else (open_clip towers: see _vision_reason; pixel-shuffle projectors; other GELU variants) raises
``NoStandardEquivalent`` with the reason.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

class NoStandardEquivalent(ValueError):
    """The model has a part with no faithful standard Hugging Face counterpart (the message says which)."""


def _projector_layout(projector: nn.Module) -> Tuple[str, nn.Linear, Optional[nn.Linear]]:
    """(projector_hidden_act, linear_1, linear_2 or None for the identity) of a projector Llava can hold."""
    net = getattr(projector, "net", None)
    if isinstance(net, nn.Linear):
        return "linear", net, None
    if (isinstance(net, nn.Sequential) and len(net) == 3 and isinstance(net[0], nn.Linear)
            and isinstance(net[1], nn.GELU) and isinstance(net[2], nn.Linear)):
        if net[1].approximate != "none":
            raise NoStandardEquivalent(f"projector GELU(approximate={net[1].approximate!r}) is not Llava's erf GELU")
        return "gelu", net[0], net[2]
    if type(projector).__name__ == "PixelShuffleMLP":
        raise NoStandardEquivalent("projector PixelShuffleMLP has no Llava equivalent (HF InternVL has the same "
                                   "pixel-shuffle + LayerNorm-Linear-GELU-Linear projector, but only behind its own "
                                   "InternViT tower, image tiling and <img> wrapper tokens)")
    raise NoStandardEquivalent(f"projector {type(projector).__name__} has no Llava equivalent "
                               "(only linear and mlp2x_gelu map onto LlavaMultiModalProjector)")


def _vision_reason(vision) -> str:
    if type(vision).__name__ == "OpenClipVisionEncoder":
        # Checked: the ViT weights would map onto CLIPVisionModel, but the pixels would not be the same.
        return ("vision tower OpenClipVisionEncoder: its image transform has no exact HF image processor "
                "(torchvision's CenterCrop rounds the crop offset half-to-even where HF processors floor it, a "
                "1-pixel shift for some image sizes; the torchvision-backend resize differs too)")
    return f"vision tower {type(vision).__name__} is not a Hugging Face CLIP/SigLIP tower"


def accept_content_lists(template: str, image_token: str) -> str:
    """``template`` preceded by a step that turns list contents (``[{"type": "image"}, {"type": "text",
    "text": ...}]``, the form transformers and lmms-eval pass to processors) into the plain strings with
    image tokens that training rendered. String contents pass through untouched, so the token ids of
    the training data do not change."""
    preamble = (
        "{%- set _norm = namespace(msgs=[]) -%}"
        "{%- for _m in messages -%}"
        "{%- if _m['content'] is string -%}{%- set _norm.msgs = _norm.msgs + [_m] -%}"
        "{%- else -%}{%- set _text = namespace(s='') -%}"
        "{%- for _c in _m['content'] -%}"
        "{%- if _c['type'] == 'image' -%}{%- set _text.s = _text.s + " + repr(image_token) + " -%}"
        "{%- elif _c['type'] == 'text' -%}{%- set _text.s = _text.s + _c['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set _norm.msgs = _norm.msgs + [{'role': _m['role'], 'content': _text.s}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = _norm.msgs -%}"
    )
    return preamble + template


def llava_processor(image_processor, tokenizer, image_token: str, patch_size: int, select_strategy: str,
                    has_cls: bool, chat_template: Optional[str], tokens_per_image: int):
    """A LlavaProcessor that expands ``image_token`` exactly as the model expects, checked on one image."""
    from PIL import Image
    from transformers import LlavaProcessor

    processor = LlavaProcessor(image_processor=copy.deepcopy(image_processor), tokenizer=tokenizer,
                               patch_size=patch_size, vision_feature_select_strategy=select_strategy,
                               chat_template=chat_template and accept_content_lists(chat_template, image_token),
                               image_token=image_token,
                               num_additional_image_tokens=1 if has_cls else 0)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if processor.image_token_id != image_token_id:
        raise NoStandardEquivalent(f"LlavaProcessor picks image token {processor.image_token!r} from the tokenizer, "
                                   f"the model uses {image_token!r}")
    probe = processor(text=image_token, images=[Image.new("RGB", (64, 48))], return_tensors="pt")
    n = int((probe["input_ids"] == image_token_id).sum())
    if n != tokens_per_image:
        raise NoStandardEquivalent(f"LlavaProcessor expands an image to {n} tokens, the model uses {tokens_per_image}")
    return processor


def composed_to_llava(model, chat_template: Optional[str]):
    """(LlavaForConditionalGeneration, LlavaProcessor) computing exactly what the composed ``model`` computes."""
    from transformers import AutoModelForImageTextToText, LlavaConfig

    from .hf_vision_tower import HFVisionEncoder

    vision = model.vision
    reasons = []
    if not isinstance(vision, HFVisionEncoder):
        reasons.append(_vision_reason(vision))
    try:
        act, linear_1, linear_2 = _projector_layout(model.projector)
    except NoStandardEquivalent as e:
        reasons.append(str(e))
    if reasons:
        raise NoStandardEquivalent("; ".join(reasons))
    vision_cfg = copy.deepcopy(vision.model.config)
    text_cfg = copy.deepcopy(model.llm.config)
    text_cfg.use_cache = True  # training switched the cache off; generation wants it
    strategy = "default" if vision.has_cls and vision.drop_cls else "full"
    feature_layer = vision.layer - (vision_cfg.num_hidden_layers + 1)
    config = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=model.image_token_id,
                         image_seq_length=model.tokens_per_image, projector_hidden_act=act,
                         vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
                         multimodal_projector_bias=linear_1.bias is not None,
                         tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)))
    if linear_2 is not None and (linear_2.bias is None) != (linear_1.bias is None):
        raise NoStandardEquivalent("projector: Llava's two linears both have a bias or neither has")
    hf = AutoModelForImageTextToText.from_config(config, dtype=model.dtype)  # LlavaForConditionalGeneration
    with torch.no_grad():
        hf.model.vision_tower.load_state_dict(vision.model.state_dict())
        proj = hf.model.multi_modal_projector
        proj.linear_1.load_state_dict(linear_1.state_dict())
        if linear_2 is None:
            proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0]))
            if proj.linear_2.bias is not None:
                proj.linear_2.bias.zero_()
        else:
            proj.linear_2.load_state_dict(linear_2.state_dict())
        hf.model.language_model.load_state_dict(model.llm.base_model.state_dict())
        hf.lm_head.load_state_dict(model.llm.get_output_embeddings().state_dict())
    hf.generation_config = copy.deepcopy(model.llm.generation_config)
    hf.eval()
    processor = llava_processor(vision.processor, model.tokenizer, model.input_spec.image_token,
                                vision_cfg.patch_size, strategy, vision.has_cls, chat_template, model.tokens_per_image)
    return hf, processor
