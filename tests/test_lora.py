"""LoRA students (peft): adapters from the student's model file, on its language model only; only the
adapters train; merging gives the adapter model's logits; a real run trains, resumes exactly and
exports the merged standard model (and the PEFT adapter) under ZeRO-0/2/3."""

from __future__ import annotations

import logging

import pytest
import torch

from taid_vlm.models import build_model
from taid_vlm.models.lora import merge_for_export
from tests.models_helpers import load_cfg, with_changes
from tests.test_trainer_recipe import config

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def adapter_count(hidden: int, kv_out: int, layers: int, r: int) -> int:
    """LoRA A [r, in] + B [out, r] on q_proj (hidden -> hidden) and v_proj (hidden -> kv_out), per layer."""
    return layers * r * ((hidden + hidden) + (hidden + kv_out))


def randomise_adapters(model) -> None:
    """peft starts B at zero (the adapter model equals the base); trained adapters are not zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)


def test_text_student_trains_only_its_adapters_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="taid_vlm.models"):
        student = build_model(with_changes(load_cfg("tiny_text_student"), lora=LORA), "student", "student.model")
    trainable = {n: p.numel() for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # hidden 64, 4 heads of 16, 2 KV heads -> v_proj 64 -> 32; 2 layers
    assert sum(trainable.values()) == adapter_count(64, 32, 2, 4) == 1792
    total = sum(p.numel() for p in student.parameters())
    assert f"LoRA r 4 alpha 8 on q_proj, v_proj: 1792 adapter parameters; 1792 of {total} parameters train" in caplog.text


def test_merged_student_computes_what_the_adapter_model_computed():
    student = build_model(with_changes(load_cfg("tiny_text_student"), lora=LORA), "student", "student.model")
    randomise_adapters(student)
    ids = torch.randint(0, len(student.tokenizer), (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapters = student(ids)
        assert merge_for_export(student) is None  # save_adapter not asked for
        merged = student(ids)
    assert not any("lora_" in n for n, _ in student.named_parameters())
    assert type(student.llm.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # the standard architecture again
    assert "lora" not in student.model_config
    torch.testing.assert_close(merged, with_adapters, rtol=0, atol=1e-5)
    assert (with_adapters - student.llm(ids).logits).abs().max() < 1e-5  # the plain HF model, no adapter code


def test_composed_student_puts_adapters_on_its_language_model_and_trains_the_named_components_too():
    cfg = with_changes(load_cfg("tiny_vlm_student"), lora={**LORA, "target_modules": "all-linear", "train": ["projector"]})
    student = build_model(cfg, "student", "student.model")
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    adapters = [n for n in trainable if "lora_" in n]
    assert adapters and all(n.startswith("llm.") for n in adapters)  # never the vision tower's linear layers
    assert set(trainable) - set(adapters) == {n for n, _ in student.projector.named_parameters(prefix="projector")}
    # all-linear: the 7 projections of each of the 2 decoder layers, A and B each
    assert len(adapters) == 2 * 7 * 2


def test_hf_vlm_student_adapts_its_language_model_only(tmp_path):
    from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer
    from tests.hf_family_helpers import model_cfg

    build_family_tokenizer("qwen2_vl", save_dir=tmp_path)
    student = build_model(model_cfg("qwen2_vl", tmp_path, lora={**LORA, "save_adapter": True}), "student",
                          "student.model")
    adapters = [n for n, p in student.named_parameters() if p.requires_grad]
    assert adapters and all(n.startswith("hf.model.language_model.") and "lora_" in n for n in adapters)
    assert len(adapters) == 2 * 2 * 2  # q_proj and v_proj of 2 layers, A and B
    randomise_adapters(student)
    ids = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_adapters = student(ids)
        adapter = merge_for_export(student)
        torch.testing.assert_close(student(ids), with_adapters, rtol=0, atol=1e-5)
    adapter.save(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("lora, message", [
    ({"rank": 4}, r"student.model.lora.rank: unknown key"),
    ({"target_modules": ["no_such_proj"]}, r"student.model.lora: Target modules \{'no_such_proj'\} not found"),
    ({"train": ["vision"]}, r"student.model.lora.train: 'vision' is not a component \(known: embeddings, llm\)"),
])
def test_a_bad_lora_setting_names_its_key(lora, message):
    with pytest.raises(ValueError, match=message):
        build_model(with_changes(load_cfg("tiny_text_student"), lora=lora), "student", "student.model")


def test_a_teacher_cannot_have_adapters():
    with pytest.raises(ValueError, match=r"teacher.model.lora: LoRA adapters are for the student"):
        build_model(with_changes(load_cfg("tiny_text_teacher"), lora=LORA), "teacher", "teacher.model")


def plain_state(student) -> dict:
    """The language model's weights without adapters, named as in the standard model (the PEFT base)."""
    return {k.replace(".base_layer.", "."): v for k, v in student.llm.state_dict().items() if "lora_" not in k}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_lora_run_resumes_exactly_and_exports_the_merged_model(shapes_text, tmp_path, one_process_group,  # noqa: F811
                                                               zero_stage):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from taid_vlm.train.export import consolidated_student_state, export_student, load_student
    from taid_vlm.train.trainer import Trainer

    out = tmp_path / "run"
    cfg = config(shapes_text, out, f"deepspeed.zero_stage={zero_stage}", "train.total_steps=4",
                 "student.model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj], save_adapter: true}")
    run = Trainer(cfg).setup().resume()
    assert run.engine.module.student.llm.model.layers[0].self_attn.q_proj.lora_A is not None
    numel = lambda p: int(getattr(p, "ds_numel", 0)) or p.numel()  # noqa: E731 (ZeRO-3: the full size)
    assert sum(map(numel, run.params)) == adapter_count(64, 32, 2, 4)  # the optimizer holds only the adapters
    run.train_step(), run.train_step()
    at_2 = run.save()
    third = run.train_step()

    cfg.train.resume = True
    again = Trainer(cfg).setup().resume()
    assert again.step == 2
    resumed = again.train_step()
    assert resumed["loss"] == pytest.approx(third["loss"], rel=1e-6)  # the same adapters, optimizer state and data
    at_3 = again.save()
    before, after = consolidated_student_state(at_2, zero_stage), consolidated_student_state(at_3, zero_stage)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)  # the base weights never move
    assert any("lora_B" in k for k in changed) and all(after[k].abs().sum() > 0 for k in after if "lora_B" in k)

    student, _ = load_student(at_3)
    ids = torch.randint(0, len(student.tokenizer), (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapter_logits = student(ids)
    export_student(at_3, tmp_path / "export")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_logits, rtol=0, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
        base.load_state_dict(plain_state(student))  # the student's starting weights: its frozen base
        with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "export" / "adapter")).eval()
        torch.testing.assert_close(with_adapter(ids).logits, adapter_logits, rtol=0, atol=1e-5)
