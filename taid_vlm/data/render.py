"""Render a Sample for one model (InputSpec): token ids, labels on assistant tokens only, pixels.

Steps for a conversation:
1. each ``<image>`` marker becomes ONE ``spec.image_token``;
2. the chat template (``spec.chat_template``, else the tokenizer's own, else the library's ChatML
   ``CHATML_TEMPLATE``) renders and tokenizes it through transformers' ``apply_chat_template`` with
   ``return_assistant_tokens_mask=True``: the template's ``{% generation %}`` blocks mark the
   supervised tokens (assistant content and its end-of-turn token). Templates without such blocks
   (most stock ones, Qwen2's included) are handled by rendering prefixes: the tokens that the i-th
   assistant message adds to the conversation rendered up to its generation prompt are supervised
   (this includes whatever the template writes after the turn, e.g. a newline);
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
token but the first is supervised. Labels are NOT shifted: ``labels[i]`` is the token at ``i`` when it
is supervised, else -100; position 0 is never supervised (nothing predicts it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..spec import InputSpec
from ..tokenizer import CHATML_TEMPLATE
from .formats import IMAGE_MARKER
from .samples import Sample
from .skips import BAD_CONVERSATION, MARKER_MISMATCH, TOO_LONG, SampleError

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


_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_blocks(template: str) -> bool:
    return bool(_GENERATION_BLOCK.search(template))


def _render(tok, msgs, template, **kwargs) -> List[int]:
    out = tok.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def assistant_mask_from_prefixes(tok, msgs, template) -> tuple[List[int], List[bool]]:
    """Token ids of the whole conversation and a mask of the tokens each assistant turn adds.

    Written by hand because transformers only derives assistant masks from {% generation %} blocks.
    """
    ids = _render(tok, msgs, template)
    mask = [False] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(_render(tok, msgs[:i], template, add_generation_prompt=True)) if i else 0
        upto = _render(tok, msgs[: i + 1], template)
        if ids[: len(upto)] != upto or len(upto) < start:
            raise SampleError(BAD_CONVERSATION, "chat template is not prefix-stable; add {% generation %} blocks")
        for k in range(start, len(upto)):
            mask[k] = True
    return ids, mask


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
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    template = resolve_template(spec)
    if has_generation_blocks(template):
        marked = tok.apply_chat_template(probe, chat_template=template, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)["assistant_masks"]
    else:
        try:
            marked = assistant_mask_from_prefixes(tok, probe, template)[1]
        except SampleError:
            marked = []
    if not any(marked):
        raise ValueError(
            f"{name} InputSpec: the chat template marks no assistant tokens, with {{% generation %}} blocks or "
            "by prefix rendering; pass a template like taid_vlm.tokenizer.CHATML_TEMPLATE as "
            "InputSpec.chat_template")


class Renderer:
    """Renders samples for one model; cheap to pickle into DataLoader workers."""

    def __init__(self, spec: InputSpec, max_length: int):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.spec = spec
        self.max_length = int(max_length)
        self.template = resolve_template(spec)
        self.marked = has_generation_blocks(self.template)
        self.eos_id = spec.tokenizer.eos_token_id

    # -- token ids + labels ------------------------------------------------------------------
    def _chat(self, sample: Sample):
        spec, tok = self.spec, self.spec.tokenizer
        msgs = sample.messages
        if sample.images and spec.image_token != IMAGE_MARKER:
            msgs = [{"role": m["role"], "content": m["content"].replace(IMAGE_MARKER, spec.image_token)}
                    for m in msgs]
        if self.marked:
            enc = tok.apply_chat_template(msgs, chat_template=self.template, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            ids, mask = list(enc["input_ids"]), enc["assistant_masks"]
        else:
            ids, mask = assistant_mask_from_prefixes(tok, msgs, self.template)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
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
