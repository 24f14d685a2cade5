"""Render a Sample for one model (InputSpec): token ids, labels on assistant tokens only, pixels.

Steps for a conversation:
1. each ``<image>`` marker becomes ONE ``spec.image_token``;
2. the chat template (``spec.chat_template``, else the tokenizer's own, else the library's ChatML
   ``CHATML_TEMPLATE``) renders it, with string content or, when the template reads list content,
   list content (``chat_tokens.content_form`` decides by a probe; the template then writes each image
   itself, and ``spec.image_prompt``, e.g. Qwen's vision start/image pad/vision end, is collapsed to the
   one ``spec.image_token``; a newline the template writes after an image replaces the data's
   ``"<image>\\n"`` newline). Supervised tokens follow ONE rule for every template
   (``chat_tokens``): each assistant answer's text tokens plus the end-of-turn special token right after
   it; never the turn header, the newline after the end-of-turn token or the next turn, whatever the
   template's ``{% generation %}`` blocks cover;
3. each image token is expanded to ``spec.tokens_per_image`` copies (never supervised);
4. the sequence is cut to ``max_length``; a cut that would fall inside an image span moves to the
   span's start, and the images whose spans are gone are dropped;
5. the kept images go through ``spec.image_transform`` and are stacked into ``[n, 3, H, W]``.

Dynamic-resolution models (``spec.image_processor``, e.g. Qwen2-VL, InternVL): step 3 replaces the
i-th image token by the i-th span that the model's processor gives for the sample's images (its
length and wrapper tokens vary per image), and step 5 keeps the processor's tensors
(``Rendered.image_inputs``). When a cut drops images, the kept ones are processed again on their own
(a family may treat a sample's images jointly) until the spans fit. An image whose span alone exceeds
``max_length`` or that the processor rejects skips the sample (too_long / image_rejected).

A raw document (``Sample.text``, LLM path) is tokenized as is, with the eos token appended; every
token but the first is supervised. It has no question and answer: its prompt (``Rendered.prompt_length``,
where generation starts) is its first ``prompt_tokens`` tokens (``data.prompt_tokens``; 0: the first
token), always leaving at least one token of reference continuation; the prompt tokens stay supervised. Labels are NOT shifted: ``labels[i]`` is the token at ``i`` when it
is supervised, else -100; position 0 is never supervised (nothing predicts it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..spec import InputSpec
from ..tokenizer import CHATML_TEMPLATE
from .chat_tokens import (LIST, content_form, image_separator, list_content, special_ids,
                          tokenize_with_supervision)
from .formats import IMAGE_MARKER
from .samples import Sample
from .skips import MARKER_MISMATCH, TOO_LONG, SampleError

IGNORE_INDEX = -100
IMAGE_REJECTED = "image_rejected"  # the model's image processor raised on an image of the sample


@dataclass
class Rendered:
    input_ids: List[int]
    labels: List[int]
    pixel_values: Optional[torch.Tensor] = None  # [n_images, 3, H, W] or None
    truncated: bool = False
    image_inputs: Optional[Dict[str, torch.Tensor]] = None  # dynamic-resolution models: the processor's tensors
    prompt_length: int = 0  # tokens before the last assistant turn: what a model generates from (prompt_length())

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def resolve_template(spec: InputSpec) -> str:
    return spec.chat_template or getattr(spec.tokenizer, "chat_template", None) or CHATML_TEMPLATE


def collapse(ids: List[int], labels: List[int], prompt_ids: List[int], image_token_id: int):
    """Each occurrence of ``prompt_ids`` (an image prompt with wrapper tokens) -> the one image token."""
    out_ids: List[int] = []
    out_labels: List[int] = []
    n, k = len(prompt_ids), 0
    while k < len(ids):
        if ids[k:k + n] == prompt_ids:
            out_ids.append(image_token_id)
            out_labels.append(IGNORE_INDEX)
            k += n
        else:
            out_ids.append(ids[k])
            out_labels.append(labels[k])
            k += 1
    return out_ids, out_labels


def prompt_length(labels: List[int]) -> int:
    """Where the last run of supervised tokens starts: a conversation up to its last assistant turn (the
    official TAID data split at the last generation prompt, TRL's GKD collator renders messages[:-1]
    with it); a raw document (every token but the first supervised) has its first token as prompt."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def pad_token_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
    return int(pid)


def check_spec(spec: InputSpec, name: str = "model") -> None:
    """Startup checks, with messages that say what to fix."""
    tok = spec.tokenizer
    pad_token_id(tok)
    if spec.is_multimodal:
        if spec.image_token is None or spec.image_token_id is None:
            raise ValueError(f"{name} InputSpec: multimodal spec needs image_token and image_token_id")
        ids = tok.encode(spec.image_token, add_special_tokens=False)
        if ids != [spec.image_token_id]:
            raise ValueError(
                f"{name} InputSpec: image_token {spec.image_token!r} tokenizes to {ids}, expected the single "
                f"id [{spec.image_token_id}]; add it to the tokenizer as a special token")
    probe = Sample(key="probe", images=[], messages=[{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "ok"}])
    try:
        labels = Renderer(spec, 64)._chat(probe)[1]
        why = "it renders no assistant text"
    except SampleError as e:
        labels, why = [], str(e)
    if not any(x != IGNORE_INDEX for x in labels):
        raise ValueError(
            f"{name} InputSpec: the chat template marks no assistant tokens ({why}; supervision rule: "
            "data/chat_tokens.py); pass a template like taid_vlm.tokenizer.CHATML_TEMPLATE as InputSpec.chat_template")


class Renderer:
    """Renders samples for one model; cheap to pickle into DataLoader workers."""

    def __init__(self, spec: InputSpec, max_length: int, prompt_tokens: int = 0):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.spec = spec
        self.max_length = int(max_length)
        self.prompt_tokens = int(prompt_tokens)
        self.template = resolve_template(spec)
        prompt = spec.image_prompt or spec.image_token
        self.form = content_form(spec.tokenizer, self.template, prompt if spec.is_multimodal else None)
        self.specials = special_ids(spec.tokenizer)
        self.eos_id = spec.tokenizer.eos_token_id
        listed_images = self.form == LIST and prompt and spec.image_token_id is not None
        self.prompt_ids = spec.tokenizer.encode(prompt, add_special_tokens=False) if listed_images else []
        self.after_image = image_separator(spec.tokenizer, self.template, prompt) if listed_images else ""

    # -- token ids + labels ------------------------------------------------------------------
    def _chat(self, sample: Sample):
        spec, tok = self.spec, self.spec.tokenizer
        msgs = sample.messages
        if self.form == LIST:
            msgs = list_content(msgs, with_images=bool(sample.images), after_image=self.after_image)
        elif sample.images and spec.image_token != IMAGE_MARKER:
            msgs = [{"role": m["role"], "content": m["content"].replace(IMAGE_MARKER, spec.image_token)}
                    for m in msgs]
        ids, mask = tokenize_with_supervision(tok, msgs, self.template, self.specials)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        if len(self.prompt_ids) > 1:  # the template wrote the whole image prompt: keep its image token only
            ids, labels = collapse(ids, labels, self.prompt_ids, spec.image_token_id)
        return ids, labels

    def _text(self, sample: Sample):
        ids = list(self.spec.tokenizer(sample.text, add_special_tokens=True)["input_ids"])
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids, list(ids)

    def _dynamic(self, sample: Sample, ids: List[int], labels: List[int]) -> Rendered:
        """Image spans decided per image by ``spec.image_processor`` (see the module doc)."""
        img_id = self.spec.image_token_id
        slots = [k for k, t in enumerate(ids) if t == img_id]
        if len(slots) != len(sample.images):
            raise SampleError(MARKER_MISMATCH, f"{len(slots)} image tokens in the rendered text != "
                                               f"{len(sample.images)} images")
        n = kept = len(slots)
        while True:
            try:
                inputs = self.spec.image_processor(sample.images[:kept])
            except (ValueError, TypeError, RuntimeError) as e:
                raise SampleError(IMAGE_REJECTED, f"{type(e).__name__}: {e}") from None
            longest = max((len(sp) for sp in inputs.spans), default=0)
            if longest > self.max_length:
                raise SampleError(TOO_LONG, f"an image takes {longest} tokens > max_length={self.max_length}")
            text_end = slots[kept] if kept < n else len(ids)  # a dropped image cuts the text at its place
            out_ids: List[int] = []
            out_labels: List[int] = []
            ends: List[int] = []  # where each image span ends in the output
            prev = 0
            for k, span in zip(slots[:kept], inputs.spans):
                out_ids += ids[prev:k] + span
                out_labels += labels[prev:k] + [IGNORE_INDEX] * len(span)
                ends.append(len(out_ids))
                prev = k + 1
            out_ids += ids[prev:text_end]
            out_labels += labels[prev:text_end]
            fits = sum(1 for e in ends if e <= self.max_length)
            if fits == kept:
                break
            kept = fits  # the cut falls inside an image span: drop that image and every later one
        if out_labels:
            out_labels[0] = IGNORE_INDEX
        truncated = kept < n or len(out_ids) > self.max_length
        out_ids, out_labels = out_ids[: self.max_length], out_labels[: self.max_length]
        if not any(x != IGNORE_INDEX for x in out_labels):
            raise SampleError(TOO_LONG, f"no supervised token within max_length={self.max_length}")
        return Rendered(out_ids, out_labels, None, truncated, inputs.tensors if kept else None)

    def __call__(self, sample: Sample) -> Rendered:
        rendered = self._render(sample)
        rendered.prompt_length = prompt_length(rendered.labels)
        if sample.messages is None and self.prompt_tokens:  # a raw document: its first tokens are the prompt
            rendered.prompt_length = max(1, min(self.prompt_tokens, len(rendered) - 1))
        return rendered

    def _render(self, sample: Sample) -> Rendered:
        spec = self.spec
        ids, labels = self._chat(sample) if sample.messages is not None else self._text(sample)
        if sample.images and spec.image_processor is not None:
            return self._dynamic(sample, ids, labels)
        n_img = len(sample.images)
        spans: List[int] = []  # start of each expanded image span
        if n_img:
            if not spec.is_multimodal:
                raise ValueError("a sample with images reached a text-only InputSpec")
            img_id, n_tok = spec.image_token_id, spec.tokens_per_image
            if sum(1 for t in ids if t == img_id) != n_img:
                raise SampleError(MARKER_MISMATCH, "image tokens in the rendered text != images")
            out_ids: List[int] = []
            out_labels: List[int] = []
            for t, lab in zip(ids, labels):
                if t == img_id:
                    spans.append(len(out_ids))
                    out_ids.extend([img_id] * n_tok)
                    out_labels.extend([IGNORE_INDEX] * n_tok)
                else:
                    out_ids.append(t)
                    out_labels.append(lab)
            ids, labels = out_ids, out_labels
        if labels:
            labels[0] = IGNORE_INDEX
        truncated = len(ids) > self.max_length
        if truncated:
            cut = self.max_length
            for st in spans:  # never cut an image span: cut before it instead
                if st < cut < st + spec.tokens_per_image:
                    cut = st
            ids, labels = ids[:cut], labels[:cut]
            spans = [st for st in spans if st + spec.tokens_per_image <= cut]
        if not any(x != IGNORE_INDEX for x in labels):
            raise SampleError(TOO_LONG, f"no supervised token within max_length={self.max_length}")
        pixels = None
        if spans:
            pixels = torch.stack([spec.image_transform(img) for img in sample.images[: len(spans)]])
        return Rendered(ids, labels, pixels, truncated)
