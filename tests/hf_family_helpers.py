"""Tiny random models of every supported HF VLM family, their tokenizers (with the family's published chat
template: tests/family_templates/) and test images (real photographs from scikit-image, smooth random ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_MROPE = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=14)
_PINPOINTS = [[28, 56], [56, 28], [56, 56]]

# model_type -> tiny HF config (geometry scaled down, structure as the real family)
CONFIGS = {
    "qwen2_vl": dict(text_config=dict(TEXT, rope_parameters=_MROPE),
                     vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14,
                                        spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)),
    "qwen2_5_vl": dict(text_config=dict(TEXT, rope_parameters=_MROPE),
                       vision_config=dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64,
                                          num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                          fullatt_block_indexes=[1], window_size=56)),
    "qwen3_vl": dict(text_config=dict(TEXT, head_dim=8, rope_parameters={**_MROPE, "mrope_interleaved": True}),
                     vision_config=dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64,
                                        num_heads=4, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                        deepstack_visual_indexes=[1], num_position_embeddings=64)),
    "llava_next": dict(text_config=dict(TEXT, model_type="qwen2"), image_grid_pinpoints=_PINPOINTS,
                       vision_config=dict(_VIT, model_type="clip_vision_model")),
    "llava_onevision": dict(text_config=dict(TEXT, model_type="qwen2"), image_grid_pinpoints=_PINPOINTS,
                            vision_config=dict(_VIT, model_type="siglip_vision_model", vision_use_head=False),
                            vision_feature_layer=-1),
    "internvl": dict(text_config=dict(TEXT, model_type="qwen2"), image_seq_length=1,
                     vision_config=dict(_VIT, image_size=[28, 28], patch_size=[14, 14])),
    "idefics3": dict(text_config=dict(TEXT, model_type="llama"), vision_config=_VIT, scale_factor=2),
    "smolvlm": dict(text_config=dict(TEXT, model_type="llama"), vision_config=_VIT, scale_factor=2),
    "gemma3": dict(text_config=dict(TEXT, head_dim=8, sliding_window=16), mm_tokens_per_image=4,
                   vision_config=dict(_VIT, vision_use_head=False)),  # as the real config
    "mistral3": dict(text_config=dict(TEXT, model_type="mistral", head_dim=8), spatial_merge_size=2,
                     vision_config=dict(_VIT, model_type="pixtral", head_dim=8, image_size=112)),
}

# image processor settings that keep the tiny tests small (the structure of the spans is unchanged)
IMAGE_PROCESSOR = {
    "qwen2_vl": {"size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}},
    "qwen2_5_vl": {"size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}},
    "qwen3_vl": {"size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 16}},
    "internvl": {"max_patches": 4},
    "idefics3": {"size": {"longest_edge": 56}},
    "smolvlm": {"size": {"longest_edge": 56}},
}


def model_cfg(model_type: str, tokenizer_dir, **changes) -> dict:
    cfg = {"type": "hf_vlm", "tokenizer": {"path": str(tokenizer_dir)},
           "config": {"model_type": model_type, **CONFIGS[model_type]}}
    if model_type in IMAGE_PROCESSOR:
        cfg["image_processor"] = IMAGE_PROCESSOR[model_type]
    cfg.update(changes)
    return cfg


def photo(seed: int, height: int, width: int) -> Image.Image:
    """A smooth random image (gradients + noise), like a downscaled photo."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), x * y], -1) * 100 + 128
    return Image.fromarray(np.clip(base + rng.randn(height, width, 3) * 20, 0, 255).astype(np.uint8))


TEMPLATES = Path(__file__).parent / "family_templates"
# tokens a published template writes through a tokenizer attribute ({{ bos_token }})
BOS = {"gemma3": "<bos>", "mistral3": "<s>"}
# the end-of-turn token each published template writes after an answer
END_OF_TURN = {"qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>", "internvl": "<|im_end|>",
               "llava_onevision": "<|im_end|>", "llava_next": "</s>", "idefics3": "<end_of_utterance>",
               "smolvlm": "<end_of_utterance>", "gemma3": "<end_of_turn>", "mistral3": "</s>"}


def published_template(model_type: str) -> str:
    return (TEMPLATES / f"{model_type}.jinja").read_text()


def build_published_family_tokenizer(model_type: str, save_dir):
    """The shared tiny vocabulary with the family's published chat template (tests/family_templates/README.md)."""
    from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer

    return build_family_tokenizer(model_type, save_dir=save_dir, chat_template=published_template(model_type),
                                  bos_token=BOS.get(model_type))


def photograph(name: str, scale: float = 0.25) -> Image.Image:
    """A real photograph shipped in scikit-image's wheel (astronaut, coffee, chelsea, rocket), downscaled."""
    from skimage import data

    img = Image.fromarray(getattr(data, name)())
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
