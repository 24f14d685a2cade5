"""Shared by tests/test_export_*.py: held-out samples and the check that an exported HF folder computes
exactly what the trained student computes on our own batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from taid_vlm.data import Renderer, collate
from taid_vlm.data.render import pad_token_id
from taid_vlm.data.samples import Sample


def held_out_samples(seed: int = 0) -> list:
    """Photos-like noise at odd sizes and aspect ratios (resize and crop both matter); 1 and 2 images."""
    rng = np.random.default_rng(seed)

    def image(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    return [
        Sample(key="one", images=[image(57, 83)], messages=[
            {"role": "user", "content": "<image>\nhow many red circles are there"},
            {"role": "assistant", "content": "two red circles"}]),
        Sample(key="two", images=[image(90, 41), image(33, 33)], messages=[
            {"role": "user", "content": "compare <image> and <image>"},
            {"role": "assistant", "content": "the first one is blue"},
            {"role": "user", "content": "and the second"},
            {"role": "assistant", "content": "a green square"}]),
    ]


def content_lists(messages, image_token: str) -> list:
    """The same conversation in the list form that transformers and lmms-eval use."""
    out = []
    for m in messages:
        parts = []
        for i, piece in enumerate(m["content"].split("<image>")):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


def assert_export_matches(student, out_dir: Path, samples, atol: float = 1e-5) -> dict:
    """Load ``out_dir`` with stock transformers only; the processor's token ids equal our rendering, the
    HF logits equal the student's logits on our padded batch (fp32), and ``generate`` continues greedily
    with the student's own next-token choice. Returns the largest logit difference seen."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = AutoModelForImageTextToText.from_pretrained(str(out_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(out_dir))
    renderer = Renderer(student.input_spec, max_length=512)
    rendered = [renderer(s) for s in samples]
    batch = collate(rendered, pad_token_id(student.tokenizer))
    with torch.no_grad():
        ours = student(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).float()
    worst = 0.0
    for row, (sample, r) in enumerate(zip(samples, rendered)):
        text = processor.apply_chat_template(sample.messages, tokenize=False)
        enc = processor(text=text, images=sample.images, return_tensors="pt")
        assert enc["input_ids"][0].tolist() == r.input_ids, sample.key
        as_lists = processor.apply_chat_template(content_lists(sample.messages, student.input_spec.image_token),
                                                 tokenize=False)
        assert as_lists == text, sample.key  # the {"type": "image"} form renders the same text
        assert torch.equal(enc["pixel_values"].to(r.pixel_values.dtype), r.pixel_values), sample.key
        with torch.no_grad():
            theirs = hf(**enc).logits[0].float()
        diff = float((theirs - ours[row, : len(r)]).abs().max())
        assert diff <= atol, (sample.key, diff)
        worst = max(worst, diff)
    # generation from a prompt (everything before the last assistant answer)
    sample = samples[0]
    prompt = processor.apply_chat_template(sample.messages[:-1], tokenize=False, add_generation_prompt=True)
    enc = processor(text=prompt, images=sample.images, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=4, do_sample=False)
        n = enc["input_ids"].shape[1]
        first = int(student(enc["input_ids"], enc["attention_mask"], pixel_values=enc["pixel_values"])[0, -1].argmax())
    assert out.shape[1] > n and int(out[0, n]) == first
    return {"max_abs_logit_diff": worst}
