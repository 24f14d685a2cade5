"""Text-only models, teacher/student vocabulary check, config errors, and one distillation-shaped step."""

import time

import pytest
import torch

from taid_vlm.models import build_model, check_vocab_compatible, load_model

from models_helpers import build_pair, interleaved_batch, load_cfg, one_torch_thread, with_changes  # noqa: F401


def _llm_with(cfg, **llm_changes):
    cfg = with_changes(cfg)
    cfg["llm"] = {**cfg["llm"], "config": {**cfg["llm"]["config"], **llm_changes}}
    return cfg


# --- text-only ----------------------------------------------------------------------------------------
def test_text_only_model_interface_and_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(load_cfg("tiny_text_student"))
    spec = model.input_spec
    assert spec.image_transform is None and spec.tokens_per_image == 0 and not spec.is_multimodal
    ids = torch.tensor([model.tokenizer.encode("what color is the square", add_special_tokens=False)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(ids, mask)
        h = model.hidden_states(ids, mask)
        torch.testing.assert_close(logits, model.llm(input_ids=ids, attention_mask=mask).logits)
        torch.testing.assert_close(h @ model.output_weight().T, logits, rtol=1e-6, atol=1e-6)
    assert logits.shape == (1, ids.shape[1], 512) and model.vocab_size == 512
    with pytest.raises(ValueError, match="text-only model .* got pixel_values"):
        model(ids, mask, pixel_values=torch.zeros(1, 3, 8, 8))
    model.save_pretrained(tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "t")(ids, mask), logits)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "llm")(ids).logits, logits)


def test_gradient_checkpointing_switch_keeps_gradients():
    plain = build_model(load_cfg("tiny_text_student"))
    cfg = load_cfg("tiny_text_student")
    cfg["llm"]["gradient_checkpointing"] = True
    ckpt = build_model(cfg)
    ckpt.load_state_dict(plain.state_dict())
    from taid_vlm.models.language_model import is_checkpointing

    assert is_checkpointing(ckpt.llm) and not is_checkpointing(plain.llm)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for m in (plain, ckpt):
        m.train()
        m(ids, torch.ones_like(ids)).logsumexp(-1).sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


# --- vocabulary check ---------------------------------------------------------------------------------
def test_vocab_check_accepts_padding_on_either_side():
    teacher = build_model(_llm_with(load_cfg("tiny_text_teacher"), vocab_size=576), role="teacher")
    student = build_model(load_cfg("tiny_text_student"))
    assert teacher.vocab_size == 576 and student.vocab_size == 512
    check_vocab_compatible(teacher, student)
    padded_student = build_model(_llm_with(load_cfg("tiny_text_student"), vocab_size=640))
    check_vocab_compatible(build_model(load_cfg("tiny_text_teacher"), role="teacher"), padded_student)
    vlm_teacher, vlm_student = build_pair(load_cfg("tiny_vlm_teacher"), load_cfg("tiny_vlm_student"))
    assert vlm_teacher.role == "teacher" and vlm_student.role == "student"


def test_vocab_check_rejects_a_different_tokenizer_naming_both(tmp_path):
    from taid_vlm.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(vocab_size=600, save_dir=tmp_path / "tok600")
    teacher = build_model(with_changes(load_cfg("tiny_text_teacher"), tokenizer={"path": str(tmp_path / "tok600")}),
                          role="teacher")
    student = build_model(load_cfg("tiny_text_student"))
    assert teacher.vocab_size == 600
    with pytest.raises(ValueError) as e:
        check_vocab_compatible(teacher, student)
    msg = str(e.value)
    assert msg.startswith("teacher and student vocabularies are not compatible")
    assert "teacher tokenizer " in msg and str(tmp_path / "tok600") in msg
    assert "600 tokens, output embedding 600 rows" in msg
    assert "student tokenizer" in msg and "512 tokens, output embedding 512 rows" in msg
    assert "only in teacher: [" in msg


def test_vocab_check_rejects_same_size_but_shuffled_ids(tiny_tokenizer):
    class Fake:
        def __init__(self, vocab, rows):
            self.tokenizer = type("Tok", (), {"get_vocab": lambda s: dict(vocab), "__len__": lambda s: len(vocab),
                                              "name_or_path": "fake"})()
            self.vocab_size = rows

    vocab = tiny_tokenizer.get_vocab()
    a, b = sorted(vocab)[100:102]
    swapped = dict(vocab)
    swapped[a], swapped[b] = vocab[b], vocab[a]
    with pytest.raises(ValueError, match=rf"different ids: \[{a!r}, {b!r}\]"):
        check_vocab_compatible(Fake(vocab, 512), Fake(swapped, 512))
    with pytest.raises(ValueError, match=r"student output embedding has fewer rows \(500\) than its tokenizer"):
        check_vocab_compatible(Fake(vocab, 512), Fake(vocab, 500))


# --- config errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"type": "vlm"}, r"model.type: unknown model type 'vlm'; choose from \['causal_lm', 'composed', 'hf_vlm'\]"),
    ({"projector": {"type": "foo"}}, r"model.projector.type: unknown projector 'foo'; choose from \["),
    ({"dtype": "float64"}, r"model.dtype: unknown dtype 'float64'"),
    ({"freeze": ["vison"]}, r"model.freeze: unknown component 'vison'; choose from \['embeddings', 'llm', "),
    ({"freeze": "vision"}, r"model.freeze: expected a list"),
    ({"tokenizer": {"builtin": "huge"}}, r"model.tokenizer.builtin: unknown builtin tokenizer 'huge'"),
    ({"tokenizer": {"path": "/no/such/dir"}}, r"model.tokenizer.path: '/no/such/dir' is not a local directory"),
    ({"image_token": "<img>"}, r"model.image_token: image token '<img>' is not a single token"),
    ({"llm": {"path": "/no/such/lm"}}, r"model.llm.path: '/no/such/lm' is not a local directory"),
    ({"llm": {"config": {"hidden_size": 8}}}, r"model.llm.config.model_type: required"),
    ({"llm": {"config": {"model_type": "qwen2"}, "dtype": "bf16"}}, r"model.llm.dtype: unknown key"),
    ({"vision": None}, r"model.vision: required"),
    ({"visoin": {}}, r"model.visoin: unknown key"),
])
def test_config_errors_name_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        build_model(with_changes(load_cfg("tiny_vlm_student"), **change))


def test_unsupported_heads_are_refused_at_build():
    with pytest.raises(ValueError, match=r"model.llm: output embedding has 256 rows but the tokenizer has 512"):
        build_model(_llm_with(load_cfg("tiny_text_student"), vocab_size=256))
    cfg = _llm_with(load_cfg("tiny_text_student"), model_type="gemma2", head_dim=16, final_logit_softcapping=30.0)
    cfg["llm"]["attn_implementation"] = "eager"
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30.0"):
        build_model(cfg)
    with pytest.raises(ValueError, match=r"role: unknown role 'judge'"):
        build_model(load_cfg("tiny_text_student"), role="judge")


# --- a distillation-shaped step on the tiny pair --------------------------------------------------------
def test_tiny_pair_forward_backward_step():
    teacher, student = build_pair(load_cfg("tiny_vlm_teacher"), load_cfg("tiny_vlm_student"))
    assert teacher.input_spec.tokens_per_image == 16 and student.input_spec.tokens_per_image == 9
    assert sum(p.numel() for p in teacher.parameters()) > 4 * sum(p.numel() for p in student.parameters())
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    times, losses = [], []
    for step in range(4):
        t0 = time.perf_counter()
        tb = interleaved_batch(teacher, images_per_sample=(1, 2, 0, 1), seed=step)
        sb = interleaved_batch(student, images_per_sample=(1, 2, 0, 1), seed=step)
        # same text in both: the supervised text tokens align one-to-one despite different image lengths
        t_sel = (tb[0] != teacher.input_spec.image_token_id) & tb[1].bool()
        s_sel = (sb[0] != student.input_spec.image_token_id) & sb[1].bool()
        assert torch.equal(tb[0][t_sel], sb[0][s_sel])
        with torch.no_grad():
            th = teacher.hidden_states(tb[0], tb[1], pixel_values=tb[2])
        sh = student.hidden_states(sb[0], sb[1], pixel_values=sb[2])
        tl = th[t_sel] @ teacher.output_weight().T
        sl = sh[s_sel] @ student.output_weight().T
        loss = torch.nn.functional.kl_div(sl.log_softmax(-1), tl.log_softmax(-1), log_target=True,
                                          reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    assert all(p.grad is None for p in teacher.parameters())
    assert losses[-1] < losses[0]
    print(f"\ntiny pair forward+backward+step: {[round(t * 1000, 1) for t in times]} ms")
