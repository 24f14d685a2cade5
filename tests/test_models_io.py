"""Save / load / export and freezing."""

import json

import pytest
import torch

from taid_vlm.models import build_model, load_model
from taid_vlm.models.io import CONFIG_FILE

from models_helpers import interleaved_batch, load_cfg, one_torch_thread, with_changes  # noqa: F401

HF_CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


def perturb(model):
    """Move every weight off its initial value, so a reload that re-initialises anything is caught."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)


@pytest.mark.parametrize("name, role", [("tiny_vlm_student", "student"), ("tiny_vlm_teacher", "teacher")])
def test_composed_save_load_gives_bit_identical_logits(tmp_path, name, role):
    model = build_model(load_cfg(name), role=role)
    perturb(model)
    ids, mask, pixels, _ = interleaved_batch(model)
    with torch.no_grad():
        ref = model(ids, mask, pixel_values=pixels)
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {CONFIG_FILE, "llm", "model.safetensors"}
    loaded = load_model(tmp_path / "m", role=role)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, pixel_values=pixels), ref)
    assert loaded.input_spec.tokens_per_image == model.input_spec.tokens_per_image
    assert loaded.input_spec.image_token_id == model.input_spec.image_token_id
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == \
        {n: p.requires_grad for n, p in model.named_parameters()}
    from PIL import Image

    pic = Image.new("RGB", (57, 31), (200, 10, 90))
    assert torch.equal(loaded.input_spec.image_transform(pic), model.input_spec.image_transform(pic))


def test_exported_lm_is_a_standalone_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_model(load_cfg("tiny_vlm_student"))
    perturb(model)
    model.save_pretrained(tmp_path / "m")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "llm")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m" / "llm")
    assert tok.get_vocab() == model.tokenizer.get_vocab()
    ids = torch.tensor([tok.encode("how many red circles are there", add_special_tokens=False)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids, attention_mask=mask).logits, model(ids, mask))


def test_hf_vision_tower_and_bf16_round_trip(tmp_path):
    cfg = with_changes(load_cfg("tiny_vlm_student"), dtype="bfloat16",
                       vision={"type": "hf", "config": HF_CLIP, "image_processor": {"image_mean": [0.5, 0.5, 0.5]}})
    model = build_model(cfg)
    perturb(model)
    ids, mask, pixels, _ = interleaved_batch(model)
    with torch.no_grad():
        ref = model(ids, mask, pixel_values=pixels)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["model"]
    assert saved["vision"]["image_processor"]["image_mean"] == [0.5, 0.5, 0.5]
    assert "path" not in saved["vision"]  # self-contained: no reference to where the tower came from
    loaded = load_model(tmp_path / "m")
    assert loaded.dtype == torch.bfloat16
    assert list(loaded.vision.processor.image_mean) == [0.5, 0.5, 0.5]
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, pixel_values=pixels), ref)


def test_save_with_a_gathered_state_dict_and_atomic_overwrite(tmp_path):
    model = build_model(load_cfg("tiny_vlm_student"))
    model.save_pretrained(tmp_path / "m")
    # e.g. a ZeRO-3 consolidated state dict: it, not the live weights, is what gets written
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["projector.mlp.1.bias"].fill_(0.25)
    state["llm.model.norm.weight"].fill_(2.0)
    model.save_pretrained(tmp_path / "m", state_dict=state)
    loaded = load_model(tmp_path / "m")
    assert torch.all(loaded.projector.mlp[1].bias == 0.25)
    assert torch.all(loaded.llm.model.norm.weight == 2.0)
    assert not torch.all(model.projector.mlp[1].bias == 0.25)

    # a save that dies half-way leaves the previous copy intact and no temporary folders
    def broken(directory, state_dict):
        (directory / "partial").write_text("x")
        raise RuntimeError("disk full")

    model.write_weights = broken
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert torch.all(load_model(tmp_path / "m").projector.mlp[1].bias == 0.25)


def test_load_model_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="not a saved taid-vlm model"):
        load_model(tmp_path)


# --- freezing ------------------------------------------------------------------------------------------
def _train_step(model, seed=0):
    ids, mask, pixels, _ = interleaved_batch(model, seed=seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(ids, mask, pixel_values=pixels).logsumexp(-1).mean().backward()
    opt.step()


def test_student_freezing_respected_after_an_optimizer_step():
    model = build_model(with_changes(load_cfg("tiny_vlm_student"), freeze=["vision", "embeddings"]))
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    assert not model.llm.get_input_embeddings().weight.requires_grad
    assert model.llm.model.layers[0].mlp.up_proj.weight.requires_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == p.requires_grad, n


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = build_model(load_cfg("tiny_vlm_teacher"), role="teacher")
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    student = build_model(load_cfg("tiny_vlm_student"), role="student")
    student.train()
    assert all(m.training for m in student.modules())


def test_unused_hf_tower_layers_are_not_trained():
    cfg = with_changes(load_cfg("tiny_vlm_student"), vision={"type": "hf", "config": HF_CLIP}, freeze=[])
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("encoder.layers.0.mlp.fc1.weight" in n for n in trainable)
    assert any("encoder.layers.1.mlp.fc1.weight" in n for n, _ in model.named_parameters())
    # feature_layer -2 of 2 blocks: block 1 and the final norm never reach the LM
    assert not any("encoder.layers.1." in n or "post_layernorm" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model)
    for n, p in model.named_parameters():
        assert (not torch.equal(before[n], p)) == p.requires_grad, n
