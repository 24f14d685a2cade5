"""Teacher/student alignment: the k-th supervised token is the same token in both models' batches."""

import json
import random

import pytest
import torch
from PIL import Image

from data_helpers import jpg, student_spec, teacher_spec, write_tar
from taid_vlm.data import IGNORE_INDEX, Renderer, SampleError, align_labels, build_loader, collate
from taid_vlm.data.samples import Sample

# Same vocabulary, different template: other role headers, other separators (" " before the answer
# changes the first merge), another end-of-turn token.
TEACHER_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}{% generation %}"
    "{{ m['content'] }}<|endoftext|>{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['role'] | upper + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
)
WORDS = "red green blue circle square triangle left right top bottom one two three yes no the a is".split()


def random_messages(rng: random.Random, n_images: int):
    msgs, left = [], n_images
    for t in range(rng.randint(1, 3)):
        k = left if t == 2 else rng.randint(0, left)
        left -= k
        q = " ".join(rng.choices(WORDS, k=rng.randint(1, 6))) + "?"
        parts = ["<image>"] * k + [q]
        rng.shuffle(parts)
        msgs += [{"role": "user", "content": "\n".join(parts)},
                 {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))}]
    msgs[0]["content"] = "<image>\n" * left + msgs[0]["content"]
    return msgs


def _img(rng):
    return Image.new("RGB", (rng.randint(8, 40), rng.randint(8, 40)), tuple(rng.randrange(256) for _ in range(3)))


@pytest.mark.parametrize("teacher_template,max_len", [(None, 4096), (TEACHER_TEMPLATE, 4096), (TEACHER_TEMPLATE, 90)])
def test_alignment_property_random_multi_image(tiny_tokenizer, teacher_template, max_len):
    tok = tiny_tokenizer
    s_spec, t_spec = student_spec(tok), teacher_spec(tok, chat_template=teacher_template)
    s_r, t_r = Renderer(s_spec, max_len), Renderer(t_spec, max_len)
    rng = random.Random(1234)
    n_checked = 0
    for batch_idx in range(8):
        s_items, t_items, n_imgs = [], [], []
        while len(s_items) < 4:
            n = rng.randint(0, 3)
            sample = Sample(f"k{batch_idx}", [_img(rng) for _ in range(n)], random_messages(rng, n))
            try:
                s, t = s_r(sample), t_r(sample)
            except SampleError as e:
                assert e.reason == "too_long"
                continue
            sl, tl, dropped = align_labels(s.labels, t.labels)
            if teacher_template is None and max_len > 1000:
                assert dropped == 0 and sl == s.labels  # identical rendering of the text
            s.labels, t.labels = sl, tl
            s_items.append(s)
            t_items.append(t)
            n_imgs.append((s.pixel_values.shape[0] if s.pixel_values is not None else 0,
                           t.pixel_values.shape[0] if t.pixel_values is not None else 0))
        sb, tb = collate(s_items, 4), collate(t_items, 4)
        K = sb["loss_targets"].numel()
        assert K > 0 and tb["loss_targets"].numel() == K
        assert torch.equal(sb["loss_targets"], tb["loss_targets"])
        for b in (sb, tb):
            T = b["input_ids"].shape[1]
            flat_ids, flat_labels = b["input_ids"].view(-1), b["labels"].view(-1)
            assert torch.equal(flat_ids[b["loss_positions"] + 1], b["loss_targets"])
            assert torch.equal(flat_labels[b["loss_positions"] + 1], b["loss_targets"])
            assert ((b["loss_positions"] % T) < T - 1).all()
            assert int((flat_labels != IGNORE_INDEX).sum()) == K
        # per-sample counts agree, so the flat order pairs tokens of the same sample
        Ts, Tt = sb["input_ids"].shape[1], tb["input_ids"].shape[1]
        assert torch.equal(torch.bincount(sb["loss_positions"] // Ts, minlength=4),
                           torch.bincount(tb["loss_positions"] // Tt, minlength=4))
        # image tokens: tokens_per_image per kept image, pixel rows match
        for b, spec, col in ((sb, s_spec, 0), (tb, t_spec, 1)):
            n_tok = int((b["input_ids"] == spec.image_token_id).sum())
            m = sum(x[col] for x in n_imgs)
            assert n_tok == m * spec.tokens_per_image
            assert (b["pixel_values"] is None and m == 0) or b["pixel_values"].shape[0] == m
        n_checked += K
    assert n_checked > 100


def test_align_labels_keeps_common_subsequence():
    I = IGNORE_INDEX
    s = [I, I, 5, 6, 7, 2, I, I, 8, 9, 2]
    t = [I, I, I, 15, 6, 7, 3, I, 8, 9, 3, I]
    sl, tl, dropped = align_labels(s, t)
    assert [x for x in sl if x != I] == [x for x in tl if x != I] == [6, 7, 8, 9]
    assert dropped == 6
    assert sl[3] == 6 and tl[4] == 6  # kept at their own positions
    assert align_labels(s, s) == (s, s, 0)


def test_loader_batches_are_aligned(tmp_path, tiny_tokenizer):
    rng = random.Random(7)
    samples = []
    for i in range(12):
        n = rng.randint(0, 3)
        s = {"__key__": f"m{i:03d}", "json": json.dumps({"messages": random_messages(rng, n)}).encode()}
        for k in range(n):
            s[f"{k}.jpg" if n > 1 else "jpg"] = jpg(size=12 + k)
        samples.append(s)
    path = write_tar(tmp_path / "m.tar", samples)
    loader = build_loader(path, student_spec(tiny_tokenizer), teacher_spec(tiny_tokenizer, TEACHER_TEMPLATE),
                          mode="eval", batch_size=5, max_length=512, num_workers=0)
    keys = []
    for batch in loader:
        s, t = batch["student"], batch["teacher"]
        assert torch.equal(s["loss_targets"], t["loss_targets"]) and s["loss_targets"].numel() > 0
        assert s["pixel_values"].shape[1:] == (3, 24, 24) and t["pixel_values"].shape[1:] == (3, 32, 32)
        assert int((s["input_ids"] == 3).sum()) // 4 == s["pixel_values"].shape[0]
        assert int((t["input_ids"] == 3).sum()) // 16 == t["pixel_values"].shape[0]
        keys += batch["keys"]
    assert keys == [f"m{i:03d}" for i in range(12)]
    assert loader.stats["samples"] == 12 and loader.stats["unaligned_tokens_dropped"] > 0
