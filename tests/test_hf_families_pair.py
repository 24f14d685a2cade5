"""Teacher and student from different families sharing one vocabulary (item 4 of issue 10): a Qwen2.5-VL
teacher with an InternVL student, and with a composed SigLIP + Qwen2 student. Image spans differ in
length and wrapper tokens; the supervised text tokens still align exactly, and the student learns."""

import io
import json

import pytest
import torch

from taid_vlm.data import build_loader
from taid_vlm.losses import build_loss
from taid_vlm.models import build_pair
from taid_vlm.models.tiny_family_tokenizers import build_family_tokenizer

from data_helpers import write_tar
from hf_family_helpers import model_cfg, photo
from models_helpers import one_torch_thread  # noqa: F401

ANSWERS = ["red circle on the left", "two blue squares", "a green star", "yes", "the yellow one is bigger"]


def jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def conversation_shard(path, first: int, n: int) -> str:
    samples = []
    for i in range(first, first + n):
        n_img = 1 + i % 3
        conv = [{"from": "human", "value": "<image>\n" * n_img + "What do you see?"},
                {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]},
                {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": ANSWERS[(i + 2) % 5]}]
        s = {"__key__": f"c{i:04d}", "json": json.dumps({"conversations": conv}).encode()}
        for k in range(n_img):
            s[f"{k}.jpg"] = jpeg(photo(10 * i + k, 40 + 13 * k, 70 - 11 * k))
        samples.append(s)
    return write_tar(path, samples)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    for fam in ("qwen2_5_vl", "internvl"):
        build_family_tokenizer(fam, save_dir=root / fam)
    shards = [conversation_shard(root / f"shard-{k}.tar", 6 * k, 6) for k in range(2)]
    composed = {
        "type": "composed", "tokenizer": {"path": str(root / "qwen2_5_vl")}, "image_token": "<image>",
        "vision": {"type": "hf", "config": {"model_type": "siglip_vision_model", "hidden_size": 32,
                                            "intermediate_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 4, "image_size": 32, "patch_size": 8}},
        "projector": {"type": "mlp2x_gelu"},
        "llm": {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}}
    students = {"internvl": model_cfg("internvl", root / "internvl"), "composed": composed}
    return root, shards, model_cfg("qwen2_5_vl", root / "qwen2_5_vl"), students


def loader(shards, teacher, student, **kw):
    return build_loader(shards, student.input_spec, teacher.input_spec, mode="eval", batch_size=3, max_length=512,
                        num_workers=0, seed=0, **kw)


@pytest.mark.parametrize("student_name", ["internvl", "composed"])
def test_supervised_text_tokens_align_across_families(setup, student_name):
    _, shards, teacher_cfg, students = setup
    torch.manual_seed(0)
    teacher, student = build_pair(teacher_cfg, students[student_name])
    n_samples = 0
    for batch in loader(shards, teacher, student):
        s, t = batch["student"], batch["teacher"]
        assert torch.equal(s["loss_targets"], t["loss_targets"]) and len(s["loss_targets"]) > 0
        assert s["input_ids"].shape[1] != t["input_ids"].shape[1]  # other image spans, other lengths
        assert isinstance(t["pixel_values"], dict) and "image_grid_thw" in t["pixel_values"]
        # every supervised token is answer text or the end of a turn, in the same order on both sides
        text = student.tokenizer.decode(s["loss_targets"].tolist(), skip_special_tokens=True)
        for key in batch["keys"]:
            i = int(key[1:])
            assert ANSWERS[i % 5] in text and ANSWERS[(i + 2) % 5] in text
        with torch.no_grad():
            for model, inputs in ((student, s), (teacher, t)):
                logits = model(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"])
                assert torch.isfinite(logits).all()
        n_samples += len(batch["keys"])
    assert n_samples == 12


def test_the_student_learns_from_a_teacher_of_another_family(setup):
    _, shards, teacher_cfg, students = setup
    torch.manual_seed(0)
    teacher, student = build_pair(teacher_cfg, students["internvl"])
    batches = list(loader(shards, teacher, student))
    loss_fn = build_loss("taid", t_start=0.4)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    student.train()

    def hidden(model, inputs):
        h = model.hidden_states(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"])
        return h.reshape(-1, h.shape[-1]).index_select(0, inputs["loss_positions"])

    with torch.no_grad():
        teacher_hidden = [hidden(teacher, b["teacher"]) for b in batches]
    losses = []
    for epoch in range(6):
        total = 0.0
        for b, h_t in zip(batches, teacher_hidden):
            loss = loss_fn.fused(hidden(student, b["student"]), student.output_weight(), h_t,
                                 teacher.output_weight(), labels=b["student"]["loss_targets"], chunk_size=16)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss)
        losses.append(total / len(batches))
    assert losses[-1] < 0.7 * losses[0], losses
