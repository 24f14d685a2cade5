"""Dynamic-resolution HF VLM families behind the adapter, each with its published chat template
(tests/family_templates/) and real photographs: our rendering equals the family's own processor, the model's
logits on our batch equal its logits on the processor's batch (tiny random models, fp32), and the supervised
tokens follow the one rule of data/chat_tokens.py."""

import importlib.util

import pytest
import torch

from taid_vlm.data import Renderer, Sample, collate
from taid_vlm.losses import OnlineTeacher
from taid_vlm.models import build_model
from taid_vlm.models.hf_families import FAMILIES
from taid_vlm.models.hf_qwen_image_inputs import QwenImageInputs
from hf_family_helpers import END_OF_TURN, build_published_family_tokenizer, model_cfg, photograph
from models_helpers import one_torch_thread  # noqa: F401

FAMILY_NAMES = [
    pytest.param(f, marks=pytest.mark.skipif(f == "smolvlm" and importlib.util.find_spec("num2words") is None,
                                             reason="SmolVLMProcessor needs the num2words package"))
    for f in sorted(FAMILIES)]

CONVERSATIONS = [
    [{"role": "user", "content": "<image>What color is the circle? <image>"},
     {"role": "assistant", "content": "red circle"},
     {"role": "user", "content": "And the square?"},
     {"role": "assistant", "content": "blue square"}],
    [{"role": "user", "content": "Describe the image.\n<image>"},
     {"role": "assistant", "content": "a green star on the left"}],
]
IMAGES = [[photograph("astronaut"), photograph("coffee")], [photograph("chelsea")]]


def structured(messages, images):
    """The same conversation as HF processors take it: content items of type image / text."""
    out, it = [], iter(images)
    for m in messages:
        parts = m["content"].split("<image>")
        content = []
        for k, text in enumerate(parts):
            if k:
                content.append({"type": "image", "image": next(it)})
            if text:
                content.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": content})
    return out


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_model(request, tmp_path_factory):
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    build_published_family_tokenizer(name, folder)
    torch.manual_seed(0)
    model = build_model(model_cfg(name, folder))
    with torch.no_grad():  # Gemma 3 initialises its image projection to zeros: images would not matter
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.05)
    return name, model


def reference(model, conversations, images):
    """The family's own processor on the same conversations and images (right-padded batch)."""
    proc = model.processor
    proc.tokenizer.padding_side = "right"
    texts = [proc.apply_chat_template(structured(c, i), tokenize=False) for c, i in zip(conversations, images)]
    return proc(text=texts, images=images, return_tensors="pt", padding=True, padding_side="right",
                add_special_tokens=False)


def ours(model, conversations, images, max_length=4096):
    renderer = Renderer(model.input_spec, max_length)
    rendered = [renderer(Sample(key=f"s{k}", images=i, messages=c))
                for k, (c, i) in enumerate(zip(conversations, images))]
    return rendered, collate(rendered, model.tokenizer.pad_token_id)


def test_rendering_equals_the_family_processor(family_model):
    name, model = family_model
    if name.startswith("qwen"):  # the Qwen families render through the fast path: checked here against the processor
        assert isinstance(model.input_spec.image_processor, QwenImageInputs), name
    for conv, imgs in zip(CONVERSATIONS, IMAGES):
        ref = reference(model, [conv], [imgs])
        (r,), _ = ours(model, [conv], [imgs])
        assert r.input_ids == ref["input_ids"][0].tolist(), name
        assert r.image_inputs, name
        for key, value in r.image_inputs.items():
            want = ref[key][0] if key in model.family.batched_keys else ref[key]
            assert torch.equal(value, want), (name, key)
        assert_supervised_is_answers_and_end_of_turn(name, model.tokenizer, conv, r.labels)
        sup = [t for t in r.labels if t != -100]
        assert model.input_spec.image_token_id not in sup and model.image_token_id not in sup


def assert_supervised_is_answers_and_end_of_turn(name, tok, conv, labels):
    """The supervision rule: per assistant turn its answer's tokens (a leading space merges into the first one)
    and the template's end-of-turn token; nothing else (no header, no newline, no next turn)."""
    eot = END_OF_TURN[name]
    eot_id = tok.convert_tokens_to_ids(eot)
    runs, cur = [], []
    for prev, t in zip([-100] + labels, labels):  # contiguous runs of supervised tokens
        if t != -100:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert len(runs) == len(answers), (name, [tok.decode(r) for r in runs])
    for run, answer in zip(runs, answers):
        assert run[-1] == eot_id and eot_id not in run[:-1], (name, tok.decode(run))
        assert tok.decode(run[:-1]) in (answer, " " + answer), (name, tok.decode(run))


def test_logits_on_our_batch_equal_logits_on_the_processor_batch(family_model):
    name, model = family_model
    ref = reference(model, CONVERSATIONS, IMAGES)
    _, batch = ours(model, CONVERSATIONS, IMAGES)
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    with torch.no_grad():
        mine = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
        theirs = model.hf(**ref).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(mine[real], theirs[real], rtol=0, atol=1e-5)
    with torch.no_grad():  # the images matter: other pixels, other logits
        other = {k: (v.flip(0) if v.is_floating_point() else v) for k, v in batch["pixel_values"].items()}
        moved = model(batch["input_ids"], batch["attention_mask"], pixel_values=other)
    assert (moved[real] - mine[real]).abs().max() > 1e-4


def _grads(model, batch, loss_fn, teacher_hidden):
    model.zero_grad(set_to_none=True)
    h = model.hidden_states(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
    h = h.reshape(-1, h.shape[-1]).index_select(0, batch["loss_positions"])
    w = model.output_weight()
    loss = loss_fn.fused(h, w, OnlineTeacher(teacher_hidden, w.detach()), labels=batch["loss_targets"], chunk_size=3)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_positions_checkpointing_and_freezing_by_component(family_model):
    from taid_vlm.losses import build_loss
    from taid_vlm.models.language_model import enable_checkpointing

    name, model = family_model
    _, batch = ours(model, CONVERSATIONS, IMAGES)
    loss_fn = build_loss("taid", t_start=0.4)
    with torch.no_grad():  # hidden states at the loss positions give the logits of the supervised tokens
        logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
        flat = logits.reshape(-1, logits.shape[-1])[batch["loss_positions"]]
        teacher_hidden = torch.randn(len(batch["loss_targets"]), model.hf.config.get_text_config().hidden_size)
    torch.testing.assert_close(batch["loss_targets"], batch["labels"].reshape(-1)[batch["loss_positions"] + 1])
    want = loss_fn(flat, teacher_hidden @ model.output_weight().detach().T, None, labels=batch["loss_targets"])

    model.train()
    loss, plain = _grads(model, batch, loss_fn, teacher_hidden)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    enable_checkpointing(model.hf)
    loss_ckpt, ckpt = _grads(model, batch, loss_fn, teacher_hidden)
    model.hf.gradient_checkpointing_disable()
    assert torch.equal(loss, loss_ckpt) and plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6)

    groups = model.components()
    ids = [id(p) for g in groups.values() for p in g]
    assert sorted(groups) == ["llm", "projector", "vision"] and all(groups.values())
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()}), name  # a partition
    try:
        model.freeze(["vision", "projector"])
        _, grads = _grads(model, batch, loss_fn, teacher_hidden)
        got = {id(p) for n, p in model.named_parameters() if n in grads}
        assert got == {id(p) for p in groups["llm"]}, name
    finally:
        model.requires_grad_(True)
        model.eval()


def test_a_local_folder_and_our_checkpoint_give_the_same_model(family_model, tmp_path):
    """The stock HF folder (model + processor, as from the hub) and our own save_pretrained/load_model."""
    from taid_vlm.models import load_model

    name, model = family_model
    model.hf.save_pretrained(tmp_path / "hf")
    model.processor.save_pretrained(tmp_path / "hf")
    from_folder = build_model({"type": "hf_vlm", "path": str(tmp_path / "hf")})
    model.save_pretrained(tmp_path / "ours")
    reloaded = load_model(tmp_path / "ours")
    _, batch = ours(model, CONVERSATIONS, IMAGES)
    with torch.no_grad():
        want = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
        for other in (from_folder, reloaded):
            rendered, b = ours(other, CONVERSATIONS, IMAGES)
            assert torch.equal(b["input_ids"], batch["input_ids"]), name
            got = other(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"])
            assert torch.equal(got, want), name


def test_text_only_batch_can_still_run_vision_for_zero3_and_bf16_casts_pixels(family_model):
    """Under ZeRO-3 every rank must run the same modules: a batch without images runs the vision tower on
    a blank image, with no effect on the output, and every vision parameter still gets a gradient."""
    name, model = family_model
    ids = torch.tensor([model.tokenizer.encode("what color is the circle", add_special_tokens=False)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(ids, mask)
    model.run_vision_without_images = True
    try:
        model.train()
        out = model(ids, mask)
        out.sum().backward()
    finally:
        model.run_vision_without_images = None
        model.eval()
    assert torch.equal(out.detach(), plain)
    vision = model.components()["vision"]
    without = {id(p) for p in vision if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _, batch = ours(model, CONVERSATIONS[1:], IMAGES[1:])
    model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).sum().backward()
    with_images = {id(p) for p in vision if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert without == with_images and without, name  # the same vision modules run (some layers stay unused)
    kwargs = model.model_image_inputs(batch["pixel_values"], batch["input_ids"])
    model.hf.to(torch.bfloat16)
    try:
        assert all(v.dtype == torch.bfloat16 for k, v in model.model_image_inputs(
            batch["pixel_values"], batch["input_ids"]).items() if kwargs[k].is_floating_point())
        with torch.no_grad():
            assert torch.isfinite(model(batch["input_ids"], batch["attention_mask"],
                                        pixel_values=batch["pixel_values"]).float()).all()
    finally:
        model.hf.to(torch.float32)
