"""Vision encoders (open_clip, HF CLIP/SigLIP) and projectors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from taid_vlm.models.projectors import PROJECTORS, build_projector, pixel_shuffle, projector_names
from taid_vlm.models.vision import build_vision

from models_helpers import one_torch_thread  # noqa: F401

OC_CFG = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 2.0}


def full_open_clip_tower():
    from taid_vlm.models.open_clip_tower import build_open_clip_vision_tower

    return build_open_clip_vision_tower(64, dict(OC_CFG), quick_gelu=False).eval()


# --- open_clip --------------------------------------------------------------------------------------
def test_open_clip_penultimate_tokens_match_unpruned_tower(tmp_path):
    from safetensors.torch import save_file

    full = full_open_clip_tower()
    # a full CLIP checkpoint: vision weights under "visual.", plus text-side keys that must be ignored
    state = {f"visual.{k}": v.contiguous() for k, v in full.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6)
    save_file(state, str(tmp_path / "clip.safetensors"))
    enc = build_vision({"type": "open_clip", "config": dict(OC_CFG), "pretrained": str(tmp_path / "clip.safetensors")},
                       torch.float32).eval()
    assert enc.num_tokens == 16 and enc.grid == (4, 4) and enc.hidden_size == 64
    assert len(enc.tower.transformer.resblocks) == 2  # the last block is pruned: it never feeds the LM
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = full.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC",
                                         output_extra_tokens=True)
        tokens = enc(x)
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(tokens, ref["image_intermediates"][0], rtol=0, atol=0)

    keep = build_vision({"type": "open_clip", "config": dict(OC_CFG), "pretrained": str(tmp_path / "clip.safetensors"),
                         "drop_cls": False, "feature_layer": -1}, torch.float32).eval()
    assert keep.num_tokens == 17
    with torch.no_grad():
        ref_last = full.forward_intermediates(x, indices=[2], intermediates_only=True, output_fmt="NLC",
                                              output_extra_tokens=True)
        out = keep(x)
    torch.testing.assert_close(out[:, 0:1], ref_last["image_intermediates_prefix"][0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1:], ref_last["image_intermediates"][0], rtol=0, atol=0)


def test_open_clip_weights_that_do_not_fit_are_an_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(8, 3, 8, 8)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"model.vision.pretrained: weights .* do not fit"):
        build_vision({"type": "open_clip", "config": dict(OC_CFG), "pretrained": str(tmp_path / "bad.safetensors")},
                     torch.float32)
    with pytest.raises(ValueError, match=r"model.vision.pretrained: .*not a local file"):
        build_vision({"type": "open_clip", "config": dict(OC_CFG), "pretrained": str(tmp_path / "missing.pt")},
                     torch.float32)


def test_open_clip_model_name_uses_its_registered_config_and_preprocessing(tmp_path):
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": dict(OC_CFG, image_size=48),
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (tmp_path / "taid-test-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    enc = build_vision({"type": "open_clip", "model": "taid-test-tiny-vit"}, torch.float32)
    assert enc.image_size == (48, 48) and enc.num_tokens == 36
    # mean/std 0.5 from the model config: mid-gray maps to ~0, and any image comes out 48x48
    gray = enc.image_transform(Image.new("RGB", (100, 70), (128, 128, 128)))
    assert gray.shape == (3, 48, 48)
    assert gray.abs().max() < 0.01
    with pytest.raises(ValueError, match="model.vision.model: unknown open_clip model 'no-such-model'"):
        build_vision({"type": "open_clip", "model": "no-such-model"}, torch.float32)


def test_open_clip_transform_defaults_to_openai_normalisation():
    enc = build_vision({"type": "open_clip", "config": dict(OC_CFG)}, torch.float32)
    mean = (0.48145466, 0.4578275, 0.40821073)
    img = Image.fromarray(np.full((50, 40, 3), [round(m * 255) for m in mean], dtype=np.uint8))
    px = enc.image_transform(img)
    assert px.shape == (3, 32, 32) and px.dtype == torch.float32
    assert px.abs().max() < 0.01


@pytest.mark.parametrize("bad, match", [
    ({"feature_layer": 3}, r"model.vision.feature_layer: feature layer must be an int in \[-3, 2\], got 3"),
    ({"config": dict(OC_CFG, patch_dropout=0.5)}, "patch_dropout"),
    ({"config": dict(OC_CFG, wdith=8)}, r"model.vision.config.wdith: unknown key"),
    ({"preprocess": {"size": 64}}, r"model.vision.preprocess.size: unknown key"),
    ({"model": "RN50"}, "exactly one of 'model'"),
    ({"type": "timm"}, r"model.vision.type: unknown vision encoder type 'timm'; choose from \['hf', 'open_clip'\]"),
])
def test_open_clip_config_errors_name_the_key(bad, match):
    cfg = {"type": "open_clip", "config": dict(OC_CFG), **bad}
    with pytest.raises(ValueError, match=match):
        build_vision(cfg, torch.float32)


# --- Hugging Face towers ------------------------------------------------------------------------------
HF_CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
           "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


def test_hf_clip_tower_from_config_and_from_folder(tmp_path):
    from transformers import CLIPVisionModel

    enc = build_vision({"type": "hf", "config": dict(HF_CLIP)}, torch.float32).eval()
    assert enc.num_tokens == 16 and enc.grid == (4, 4) and enc.hidden_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(x)
        ref = enc.model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(tokens, ref, rtol=0, atol=0)
    # parameters past the feature layer never reach the LM
    unused = {id(p) for p in enc.unused_parameters()}
    names = [n for n, p in enc.model.named_parameters() if id(p) in unused]
    assert names and all(".layers.2." in n or "post_layernorm" in n for n in names)
    assert not any(".layers.1." in n for n in names)

    enc.model.save_pretrained(tmp_path / "clip")
    enc.processor.save_pretrained(tmp_path / "clip")
    again = build_vision({"type": "hf", "path": str(tmp_path / "clip")}, torch.float32).eval()
    assert isinstance(again.model, CLIPVisionModel)
    with torch.no_grad():
        torch.testing.assert_close(again(x), tokens, rtol=0, atol=0)
    img = Image.new("RGB", (64, 40), (10, 200, 30))
    torch.testing.assert_close(again.image_transform(img), enc.image_transform(img))
    assert again.image_transform(img).shape == (3, 32, 32)


def test_hf_siglip_tower_has_no_cls_token():
    cfg = dict(HF_CLIP, model_type="siglip_vision_model")
    enc = build_vision({"type": "hf", "config": cfg, "feature_layer": -1}, torch.float32).eval()
    assert enc.num_tokens == 16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = enc.model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(enc(x), ref, rtol=0, atol=0)
    assert enc.image_transform(Image.new("RGB", (20, 50))).shape == (3, 32, 32)


def test_hf_tower_config_errors():
    with pytest.raises(ValueError, match=r"model.vision.config.model_type: unknown vision model type 'vit'"):
        build_vision({"type": "hf", "config": dict(HF_CLIP, model_type="vit")}, torch.float32)
    with pytest.raises(ValueError, match=r"model.vision.path: .* is not a local directory"):
        build_vision({"type": "hf", "path": "/nonexistent/clip"}, torch.float32)


# --- projectors -----------------------------------------------------------------------------------
def test_projector_shapes_and_token_counts():
    x = torch.randn(3, 16, 24)
    for name, k in (("linear", 16), ("mlp2x_gelu", 16), ("pixel_shuffle_mlp", 4)):
        proj = build_projector({"type": name}, 24, 40, (4, 4), 16)
        assert proj.num_output_tokens(16) == k
        assert proj(x).shape == (3, k, 40)


def test_pixel_shuffle_merges_2x2_neighbours_row_major():
    h = w = 4
    d = 3
    x = torch.arange(h * w * d, dtype=torch.float32).reshape(1, h * w, d)
    out = pixel_shuffle(x, (h, w), 2)
    assert out.shape == (1, 4, 4 * d)
    grid = x.reshape(h, w, d)
    for bi in range(2):
        for bj in range(2):
            expected = torch.cat([grid[2 * bi + di, 2 * bj + dj] for di in range(2) for dj in range(2)])
            assert torch.equal(out[0, bi * 2 + bj], expected)


def test_pixel_shuffle_needs_a_grid_without_cls():
    with pytest.raises(ValueError, match="pixel_shuffle_mlp needs vision tokens on a grid without a CLS token"):
        build_projector({"type": "pixel_shuffle_mlp"}, 24, 40, (4, 4), 17)


def _plain_shuffle(x, h, w, f):
    """The reference for a grid f divides: blocks of f x f patches, no padding."""
    b, _, d = x.shape
    return x.reshape(b, h // f, f, w // f, f, d).permute(0, 1, 3, 2, 4, 5).reshape(b, (h // f) * (w // f), f * f * d)


def test_pixel_shuffle_even_grid_unchanged_and_odd_grid_zero_padded():
    d = 3
    even = torch.randn(2, 4 * 6, d)
    assert torch.equal(pixel_shuffle(even, (4, 6), 2), _plain_shuffle(even, 4, 6, 2))

    h, w = 5, 7  # odd both ways: padded to 6 x 8 with zero patches at the bottom and right
    odd = torch.randn(2, h * w, d)
    out = pixel_shuffle(odd, (h, w), 2)
    assert out.shape == (2, 3 * 4, 4 * d)
    padded = torch.zeros(2, 6, 8, d)
    padded[:, :h, :w] = odd.reshape(2, h, w, d)
    assert torch.equal(out, _plain_shuffle(padded.reshape(2, 48, d), 6, 8, 2))
    assert torch.equal(out[0, -1], torch.cat([padded[0, 4, 6], torch.zeros(3 * d)]))  # 1 real patch, 3 pads

    # SigLIP-so400m at 384 px / patch 14: a 27 x 27 grid -> 14 x 14 = 196 image tokens
    proj = build_projector({"type": "pixel_shuffle_mlp", "factor": 2}, 8, 16, (27, 27), 729)
    assert proj.num_output_tokens(729) == 196
    assert proj(torch.randn(1, 729, 8)).shape == (1, 196, 16)
    with pytest.raises(ValueError, match="built for a 27x27 grid, got 730 tokens"):
        proj.num_output_tokens(730)


def test_unknown_projector_names_the_key_and_the_choices():
    with pytest.raises(ValueError) as e:
        build_projector({"type": "foo"}, 24, 40, (4, 4), 16)
    assert str(e.value) == ("model.projector.type: unknown projector 'foo'; choose from "
                            f"{sorted(projector_names())}")
    with pytest.raises(ValueError, match=r"model.projector.depth: unknown key"):
        build_projector({"type": "mlp2x_gelu", "depth": 3}, 24, 40, (4, 4), 16)


def test_adding_a_projector_is_one_function_and_its_entry(monkeypatch):
    def _mean_pool(vision_dim, llm_dim, grid, num_tokens, where):
        class MeanPool(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(vision_dim, llm_dim)

            def num_output_tokens(self, n_in):
                return 1

            def forward(self, x):
                return self.proj(x.mean(1, keepdim=True))

        return MeanPool()

    monkeypatch.setitem(PROJECTORS, "test_mean_pool", _mean_pool)
    proj = build_projector({"type": "test_mean_pool"}, 24, 40, (4, 4), 16)
    assert proj(torch.randn(2, 16, 24)).shape == (2, 1, 40)
    assert "test_mean_pool" in projector_names()


def test_image_transforms_survive_pickling_for_dataloader_workers():
    import pickle

    img = Image.new("RGB", (40, 30), (90, 20, 200))
    for cfg in ({"type": "open_clip", "config": dict(OC_CFG)}, {"type": "hf", "config": dict(HF_CLIP)}):
        transform = build_vision(cfg, torch.float32).image_transform
        clone = pickle.loads(pickle.dumps(transform))
        assert torch.equal(clone(img), transform(img))
