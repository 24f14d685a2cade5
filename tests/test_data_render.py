"""Rendering for one model: assistant-only labels, image expansion, truncation never inside an image."""

import pytest
import torch

from data_helpers import jpg, student_spec, teacher_spec
from taid_vlm.data import IGNORE_INDEX, Renderer, SampleError, decode_sample
from taid_vlm.data.samples import Sample
from taid_vlm.spec import InputSpec


def _img():
    from PIL import Image
    return Image.new("RGB", (20, 20), (10, 200, 10))


def _runs(labels):
    """Contiguous runs of supervised positions."""
    runs, cur = [], []
    for i, x in enumerate(labels):
        if x != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_labels_cover_exactly_the_assistant_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    answers = ["a red circle", "two shapes, left and right"]
    msgs = [{"role": "system", "content": "you are a helpful model"},
            {"role": "user", "content": "<image>\nwhat is it?"}, {"role": "assistant", "content": answers[0]},
            {"role": "user", "content": "how many?"}, {"role": "assistant", "content": answers[1]}]
    r = Renderer(student_spec(tok), 512)(Sample("k", [_img()], msgs))
    runs = _runs(r.labels)
    assert len(runs) == 2
    for run, ans in zip(runs, answers):
        assert [r.input_ids[i] for i in run] == [r.labels[i] for i in run]
        # exactly the answer and its end-of-turn token, nothing of the prompt
        assert [r.input_ids[i] for i in run] == tok.encode(ans, add_special_tokens=False) + [tok.eos_token_id]
        assert tok.decode([r.input_ids[run[0] - 1]]) == "\n"  # the token just before is the template's
    sup = sum(len(run) for run in runs)
    assert sup == r.n_supervised == sum(len(tok.encode(a, add_special_tokens=False)) + 1 for a in answers)


@pytest.mark.parametrize("spec_fn,n_tok,side", [(student_spec, 4, 24), (teacher_spec, 16, 32)])
def test_image_placeholders_expand_to_tokens_per_image(tiny_tokenizer, spec_fn, n_tok, side):
    spec = spec_fn(tiny_tokenizer)
    msgs = [{"role": "user", "content": "<image><image>\nsame?\n<image>"}, {"role": "assistant", "content": "no"}]
    r = Renderer(spec, 512)(Sample("k", [_img(), _img(), _img()], msgs))
    ids = torch.tensor(r.input_ids)
    img = ids == spec.image_token_id
    assert int(img.sum()) == 3 * n_tok
    assert not any(r.labels[i] != IGNORE_INDEX for i in img.nonzero().flatten().tolist())
    assert r.pixel_values.shape == (3, 3, side, side)


def test_truncation_never_cuts_an_image_span(tiny_tokenizer):
    spec = teacher_spec(tiny_tokenizer)  # 16 tokens per image
    msgs = [{"role": "user", "content": "<image>\nfirst answer please"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "<image>\nand this one?"}, {"role": "assistant", "content": "two three"}]
    full = Renderer(spec, 4096)(Sample("k", [_img(), _img()], msgs))
    ids = full.input_ids
    second = [i for i, t in enumerate(ids) if t == spec.image_token_id][16]  # start of image 2's span
    seen_cut = False
    for max_len in range(second - 2, len(ids) + 1):
        try:
            r = Renderer(spec, max_len)(Sample("k", [_img(), _img()], msgs))
        except SampleError:
            continue
        n_img_tokens = sum(1 for t in r.input_ids if t == spec.image_token_id)
        assert n_img_tokens % 16 == 0 and len(r) <= max_len
        assert r.pixel_values.shape[0] == n_img_tokens // 16
        assert r.input_ids == ids[: len(r)]
        if second < max_len < second + 16:
            assert len(r) == second and n_img_tokens == 16 and r.truncated  # cut moved to the span start
            seen_cut = True
    assert seen_cut


def test_too_long_when_no_answer_fits(tiny_tokenizer):
    spec = teacher_spec(tiny_tokenizer)
    msgs = [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(SampleError) as e:
        Renderer(spec, 12)(Sample("k", [_img()], msgs))
    assert e.value.reason == "too_long"


def test_raw_text_document(tiny_tokenizer):
    tok = tiny_tokenizer
    r = Renderer(InputSpec(tok), 64)(Sample("k", [], None, text="a red circle"))
    assert r.input_ids == tok.encode("a red circle", add_special_tokens=False) + [tok.eos_token_id]
    assert r.labels == [IGNORE_INDEX] + r.input_ids[1:]


def test_caption_record_becomes_instruction_and_answer(tiny_tokenizer):
    raw = {"__key__": "c1", "jpg": jpg(), "txt": b"a red square"}
    s = decode_sample(raw, caption_instruction="Caption this.")
    assert s.messages == [{"role": "user", "content": "<image>\nCaption this."},
                          {"role": "assistant", "content": "a red square"}]
    r = Renderer(student_spec(tiny_tokenizer), 256)(s)
    sup = [t for t in r.labels if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(sup) == "a red square<|im_end|>"


def test_custom_image_token_string(tiny_tokenizer):
    """A model whose placeholder is another special token: markers are rewritten to it."""
    tok = tiny_tokenizer
    pad_id = tok.convert_tokens_to_ids("<|pad|>")
    spec = InputSpec(tok, student_spec(tok).image_transform, 5, pad_id, "<|pad|>")
    msgs = [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "red"}]
    r = Renderer(spec, 256)(Sample("k", [_img()], msgs))
    assert sum(1 for t in r.input_ids if t == pad_id) == 5
    assert tok.convert_tokens_to_ids("<image>") not in r.input_ids
