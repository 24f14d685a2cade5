"""Native Hugging Face VLM adapter (LlavaForConditionalGeneration from a tiny random config)."""

import pytest
import torch
from PIL import Image

from taid_vlm.models import build_model, load_model

from models_helpers import interleaved_batch, one_torch_thread  # noqa: F401


def llava_cfg(**changes):
    cfg = {
        "type": "hf_vlm",
        "tokenizer": {"builtin": "tiny"},
        "config": {
            "model_type": "llava",
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
            "text_config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
        },
    }
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    return build_model(llava_cfg())


class _Adapter:  # interleaved_batch reads vision.image_size from composed models; give it the same view
    def __init__(self, model):
        self.input_spec, self.tokenizer = model.input_spec, model.tokenizer
        self.hf = model.hf


def test_input_spec_comes_from_the_hf_config(llava):
    spec = llava.input_spec
    assert spec.tokens_per_image == 16  # (32 / 8)^2 patches, CLS dropped by the "default" strategy
    assert spec.image_token_id == llava.tokenizer.convert_tokens_to_ids("<image>") == llava.hf.config.image_token_id
    assert spec.image_transform(Image.new("RGB", (50, 70))).shape == (3, 32, 32)
    full = build_model(llava_cfg(config={**llava_cfg()["config"], "vision_feature_select_strategy": "full"}))
    assert full.input_spec.tokens_per_image == 17


def test_llava_forward_matches_hf_and_the_hidden_state_contract(llava):
    ids, mask, pixels, _ = interleaved_batch(_Adapter(llava), images_per_sample=(1, 2))
    with torch.no_grad():
        logits = llava(ids, mask, pixel_values=pixels)
        hf_logits = llava.hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        h = llava.hidden_states(ids, mask, pixel_values=pixels)
    assert logits.shape == (*ids.shape, llava.vocab_size)
    torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h @ llava.output_weight().T, logits, rtol=1e-6, atol=1e-6)
    # images change the logits (the splice is real), and a text-only row still runs
    with torch.no_grad():
        other = llava(ids, mask, pixel_values=pixels.roll(1, dims=0))
        assert not torch.allclose(other, logits, atol=1e-3)
        text = torch.tensor([[5, 6, 7]])
        assert llava(text, torch.ones_like(text)).shape == (1, 3, llava.vocab_size)


def test_llava_placeholder_count_error_and_bf16_pixels(llava):
    ids, mask, pixels, _ = interleaved_batch(_Adapter(llava), images_per_sample=(1, 1))
    with pytest.raises(ValueError, match=r"32 placeholder tokens.*1 images x 16 tokens per image = 16"):
        llava(ids, mask, pixel_values=pixels[:1])
    bf16 = build_model(llava_cfg(dtype="bfloat16"))
    out = bf16(ids, mask, pixel_values=pixels)  # float32 pixels into a bf16 model
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_llava_as_teacher_and_freezing(tmp_path):
    teacher = build_model(llava_cfg(), role="teacher")
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.hf.training
    student = build_model(llava_cfg(freeze=["vision"]))
    vision = {id(p) for p in student.hf.base_model.vision_tower.parameters()}
    assert vision and all(not p.requires_grad for p in student.parameters() if id(p) in vision)
    assert all(p.requires_grad for p in student.parameters() if id(p) not in vision)
    with pytest.raises(ValueError, match=r"model.freeze: unknown component 'vison'; choose from "
                                         r"\['llm', 'projector', 'vision'\]"):
        build_model(llava_cfg(freeze=["vison"]))


def test_llava_save_load_bit_identical(tmp_path, llava):
    ids, mask, pixels, _ = interleaved_batch(_Adapter(llava))
    with torch.no_grad():
        ref = llava(ids, mask, pixel_values=pixels)
    llava.save_pretrained(tmp_path / "llava")
    loaded = load_model(tmp_path / "llava", role="teacher")
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, pixel_values=pixels), ref)
    assert loaded.input_spec.tokens_per_image == 16
    img = Image.new("RGB", (40, 40), (1, 2, 3))
    assert torch.equal(loaded.input_spec.image_transform(img), llava.input_spec.image_transform(img))
    # the saved folder is a plain HF model too
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava" / "hf_model")
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)


def test_llava_image_token_must_match_the_tokenizer():
    cfg = llava_cfg()
    cfg["config"]["image_token_index"] = 7
    with pytest.raises(ValueError, match=r"image_token_id 7 is not the tokenizer's id 3 for '<image>'"):
        build_model(cfg)


def test_llava_text_only_batch_can_still_run_vision_for_zero3():
    model = build_model(llava_cfg())
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = model(ids, torch.ones_like(ids))
    model.run_vision_without_images = True
    with_dummy = model(ids, torch.ones_like(ids))
    assert torch.equal(plain, with_dummy)
    with_dummy.sum().backward()
    proj = model.hf.base_model.multi_modal_projector.linear_1.weight
    assert proj.grad is not None and torch.count_nonzero(proj.grad) == 0
