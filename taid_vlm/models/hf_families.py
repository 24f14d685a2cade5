"""Dynamic-resolution Hugging Face VLM families: what differs between them, in one table.

Each family's own HF processor decides, per image, the token span (wrapper tokens included) and the
pixel inputs (``processor_image_inputs``). What the adapter needs on top is small and listed here:

- ``build_processor``: the family's processor built from its classes, with the geometry of a model
  config (for models built from a config dict; a model folder ships its own processor);
- ``token_ids``: config fields that name special tokens, filled from the tokenizer when a model is
  built from a config dict;
- ``batched_keys``: per-image tensors that the model takes with a leading batch axis of images
  (Idefics3/SmolVLM: ``[1, n_images, ...]``); the data side keeps them flat ``[n, ...]``;
- ``type_ids``: the model wants a 0/1 mask of its image tokens under this argument name (Qwen's
  ``mm_token_type_ids`` for 3-D rotary positions; Gemma 3's ``token_type_ids``: bidirectional attention
  inside an image); the adapter derives it from ``input_ids``;
- ``image_prompt``: how the family's chat template writes one image, ``{image}`` standing for the
  processor's placeholder token (Qwen wraps it in vision start/end tokens). The data side puts ONE
  placeholder token in the text and replaces it by the span of this prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple


@dataclass(frozen=True)
class Family:
    build_processor: Callable[[Any, Any, dict], Any]  # (tokenizer, hf_config, overrides) -> processor
    token_ids: Dict[str, str] = field(default_factory=dict)  # config key -> tokenizer attribute / token
    image_prompt: str = "{image}"
    batched_keys: Tuple[str, ...] = ()
    type_ids: str = ""
    vision: str = "vision_tower"  # attribute of the base model holding the vision encoder
    projector: Tuple[str, ...] = ("multi_modal_projector",)  # parameter-name prefixes (base model)


def _cls(name: str):
    import transformers

    return getattr(transformers, name)


def _split(overrides: dict) -> Tuple[dict, dict]:
    """Overrides: ``image_processor`` kwargs and processor kwargs (``processor`` sub-dict)."""
    overrides = dict(overrides or {})
    return overrides, dict(overrides.pop("processor", None) or {})


def _tpl(overrides):
    return overrides.get("chat_template")


def _qwen(processor_cls: str, video_cls: str):
    def build(tok, cfg, overrides):
        ip_kw, pr_kw = _split(overrides)
        vc = cfg.vision_config
        geometry = dict(patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                        merge_size=vc.spatial_merge_size)
        ip = _cls("Qwen2VLImageProcessor")(**{**geometry, **ip_kw})
        vp = _cls(video_cls)(**geometry)
        return _cls(processor_cls)(image_processor=ip, tokenizer=tok, video_processor=vp, **pr_kw)
    return build


def _llava_next(tok, cfg, overrides):
    ip_kw, pr_kw = _split(overrides)
    vc = cfg.vision_config
    ip = _cls("LlavaNextImageProcessor")(**{
        "size": {"shortest_edge": vc.image_size}, "crop_size": {"height": vc.image_size, "width": vc.image_size},
        "image_grid_pinpoints": cfg.image_grid_pinpoints, **ip_kw})
    has_cls = vc.model_type.startswith("clip")
    return _cls("LlavaNextProcessor")(**{
        "image_processor": ip, "tokenizer": tok, "patch_size": vc.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "num_additional_image_tokens": int(has_cls), **pr_kw})


def _llava_onevision(tok, cfg, overrides):
    ip_kw, pr_kw = _split(overrides)
    vc = cfg.vision_config
    ip = _cls("LlavaOnevisionImageProcessor")(**{
        "size": {"height": vc.image_size, "width": vc.image_size},
        "image_grid_pinpoints": cfg.image_grid_pinpoints, **ip_kw})
    vp = _cls("LlavaOnevisionVideoProcessor")(size={"height": vc.image_size, "width": vc.image_size})
    return _cls("LlavaOnevisionProcessor")(**{
        "image_processor": ip, "tokenizer": tok, "video_processor": vp,
        "num_image_tokens": (vc.image_size // vc.patch_size) ** 2,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "vision_aspect_ratio": cfg.vision_aspect_ratio, **pr_kw})


def _internvl(tok, cfg, overrides):
    ip_kw, pr_kw = _split(overrides)
    vc = cfg.vision_config
    h, w = vc.image_size
    ip = _cls("GotOcr2ImageProcessor")(**{"size": {"height": h, "width": w}, "crop_to_patches": True,
                                          "min_patches": 1, "max_patches": 12, **ip_kw})
    vp = _cls("InternVLVideoProcessor")(size={"height": h, "width": w})
    return _cls("InternVLProcessor")(**{"image_processor": ip, "tokenizer": tok, "video_processor": vp,
                                        "image_seq_length": cfg.image_seq_length, **pr_kw})


def _idefics3(processor_cls: str, image_cls: str, video_cls: str = ""):
    def build(tok, cfg, overrides):
        ip_kw, pr_kw = _split(overrides)
        vc = cfg.vision_config
        seq = int((vc.image_size // vc.patch_size) ** 2 / cfg.scale_factor ** 2)
        ip = _cls(image_cls)(**{"size": {"longest_edge": 4 * vc.image_size},
                                "max_image_size": {"longest_edge": vc.image_size}, **ip_kw})
        extra = {"video_processor": _cls(video_cls)()} if video_cls else {}
        return _cls(processor_cls)(**{"image_processor": ip, "tokenizer": tok, "image_seq_len": seq, **extra,
                                      **pr_kw})
    return build


def _gemma3(tok, cfg, overrides):
    ip_kw, pr_kw = _split(overrides)
    vc = cfg.vision_config
    ip = _cls("Gemma3ImageProcessor")(**{"size": {"height": vc.image_size, "width": vc.image_size}, **ip_kw})
    return _cls("Gemma3Processor")(**{"image_processor": ip, "tokenizer": tok,
                                      "image_seq_length": cfg.mm_tokens_per_image, **pr_kw})


def _mistral3(tok, cfg, overrides):
    ip_kw, pr_kw = _split(overrides)
    vc = cfg.vision_config
    ip = _cls("PixtralImageProcessor")(**{"size": {"longest_edge": vc.image_size},
                                          "patch_size": {"height": vc.patch_size, "width": vc.patch_size}, **ip_kw})
    return _cls("PixtralProcessor")(**{"image_processor": ip, "tokenizer": tok, "patch_size": vc.patch_size,
                                       "spatial_merge_size": cfg.spatial_merge_size, **pr_kw})


_QWEN_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
_QWEN = dict(token_ids=_QWEN_TOKENS, type_ids="mm_token_type_ids", vision="visual",
             image_prompt="<|vision_start|>{image}<|vision_end|>",
             projector=("visual.merger", "visual.deepstack_merger_list"))
_LLAVA = dict(token_ids={"image_token_id": "<image>"}, projector=("multi_modal_projector", "image_newline"))
_IDEFICS = dict(token_ids={"image_token_id": "<image>"}, batched_keys=("pixel_values", "pixel_attention_mask"),
                vision="vision_model", projector=("connector",))

FAMILIES: Dict[str, Family] = {
    "qwen2_vl": Family(_qwen("Qwen2VLProcessor", "Qwen2VLVideoProcessor"), **_QWEN),
    "qwen2_5_vl": Family(_qwen("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"), **_QWEN),
    "qwen3_vl": Family(_qwen("Qwen3VLProcessor", "Qwen3VLVideoProcessor"), **_QWEN),
    "llava_next": Family(_llava_next, **_LLAVA),
    "llava_onevision": Family(_llava_onevision, **{**_LLAVA, "token_ids": {"image_token_id": "<image>",
                                                                            "video_token_id": "<video>"}}),
    "internvl": Family(_internvl, token_ids={"image_token_id": "<IMG_CONTEXT>"}),
    "idefics3": Family(_idefics3("Idefics3Processor", "Idefics3ImageProcessor"), **_IDEFICS),
    "smolvlm": Family(_idefics3("SmolVLMProcessor", "SmolVLMImageProcessor", "SmolVLMVideoProcessor"), **_IDEFICS),
    "gemma3": Family(_gemma3, token_ids={"image_token_id": "<image_soft_token>", "boi_token_id": "<start_of_image>",
                                         "eoi_token_id": "<end_of_image>"}, type_ids="token_type_ids"),
    "mistral3": Family(_mistral3, token_ids={"image_token_index": "[IMG]"}),
}


def family(model_type: str, where: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model type {model_type!r} is not a supported dynamic-resolution family; "
                         f"supported: {sorted(FAMILIES)} (and 'llava' with a fixed image size)")
    return FAMILIES[model_type]
