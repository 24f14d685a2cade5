"""A conversation through a chat template: token ids and the supervised tokens, by one rule for every template.

Content form. Hub chat templates of VLM families read message content in one of two forms: a string
(``"<image>What is it?"``), or a list of items (``[{"type": "image"}, {"type": "text", "text": ...}]``);
some read only the list form (LLaVA-OneVision, LLaVA-NeXT, Idefics3, SmolVLM: a string renders
nothing) and some only the string form (the library's ChatML). ``content_form`` decides per template by
rendering a probe both ways: the list form when the template renders its items and writes the model's
image prompt for an image item (the form the family's own processor uses), else the string form (a
composed student may pick another image token than the template writes). In the list form every
``<image>`` marker becomes an image item and the template writes the image as it does for the processor;
a separator the template writes after an image itself (InternVL's, LLaVA-NeXT's and LLaVA-OneVision's
newline) is dropped from the text that follows a marker, so LLaVA-format data
(``"<image>\\nWhat is it?"``) renders as the processor renders ``[image, "What is it?"]``.

Requires a fast tokenizer (character offsets of the tokens), as transformers' own assistant masks do.

The supervision rule (the same for every template, whatever its ``{% generation %}`` blocks cover):
the supervised tokens of an assistant turn are
- the tokens of the answer text: every token that overlaps the characters of the message's text in the
  rendered conversation (found after the conversation rendered up to that turn's generation prompt;
  leading/trailing whitespace of the text is not looked for, since templates trim it), and
- the end-of-turn token: the token right after the answer, when it is a special token of the
  tokenizer (``<|im_end|>``, ``<end_of_utterance>``, ``<end_of_turn>``, ``</s>``): a student must learn to
  emit it to stop.
Nothing else: not the turn's header or generation prompt, not the newline a template writes after the
end-of-turn token, not the next turn. A template whose turn ends with plain text instead of a special
token has no end-of-turn token to supervise.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .formats import IMAGE_MARKER
from .skips import BAD_CONVERSATION, SampleError

LIST, STRING = "list", "string"
_PROBE = "zq probe text"


def render_text(tok, msgs, template, **kwargs) -> str:
    return tok.apply_chat_template(msgs, chat_template=template, tokenize=False, **kwargs)


def list_content(msgs: List[dict], with_images: bool, after_image: str = "") -> List[dict]:
    """String content with ``<image>`` markers -> list content (image items where the markers were). A text
    that follows a marker loses a leading ``after_image``: the separator the template writes after an image
    itself (LLaVA-format data's ``"<image>\\n"`` then renders as the family's processor renders an image item)."""
    out = []
    for m in msgs:
        parts = m["content"].split(IMAGE_MARKER) if with_images else [m["content"]]
        items: List[Dict[str, str]] = []
        for k, text in enumerate(parts):
            if k:
                items.append({"type": "image"})
                if after_image and text.startswith(after_image):
                    text = text[len(after_image):]
            if text:
                items.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": items})
    return out


def image_separator(tok, template: str, image_text: str) -> str:
    """The whitespace a list-form template writes between an image item and the text after it ("" if none)."""
    probe = [{"role": "user", "content": f"{IMAGE_MARKER}{_PROBE}"}, {"role": "assistant", "content": "ok"}]
    text = render_text(tok, list_content(probe, with_images=True), template)
    at = text.find(image_text)
    sep = text[at + len(image_text):text.find(_PROBE, at)] if at >= 0 else ""
    return sep if not sep.strip() else ""


def _renders(tok, template, msgs, *needles) -> bool:
    try:
        text = render_text(tok, msgs, template)
    except Exception:  # noqa: BLE001 - any template error means: not this form
        return False
    return all(n in text for n in needles) and "'type'" not in text  # the items, not their Python repr


def content_form(tok, template: str, image_text: Optional[str] = None) -> str:
    """LIST when ``template`` renders list-form items (and writes ``image_text`` for an image item, when
    given), else STRING; a template that reads only the list form gets LIST whatever it writes for an image."""
    probe = [{"role": "user", "content": f"{IMAGE_MARKER}{_PROBE}"}, {"role": "assistant", "content": "ok"}]
    listed = list_content(probe, with_images=image_text is not None)
    if _renders(tok, template, listed, _PROBE, *([image_text] if image_text else [])):
        return LIST
    return STRING if _renders(tok, template, probe, _PROBE) else LIST if _renders(tok, template, listed, _PROBE) \
        else STRING


def special_ids(tok) -> frozenset:
    return frozenset(i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False))


def _answer_spans(tok, msgs, template, text: str) -> List[Tuple[int, int]]:
    """Character span of each assistant message's text in the rendered conversation ``text``."""
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = render_text(tok, msgs[:i], template, add_generation_prompt=True) if i else ""
        if not text.startswith(head):
            raise SampleError(BAD_CONVERSATION, f"chat template is not prefix-stable at message {i} (the "
                                                "conversation up to a turn renders differently inside the whole)")
        parts = [it["text"] for it in m["content"] if it.get("type") == "text"] \
            if isinstance(m["content"], list) else [m["content"]]
        start, end = None, len(head)
        for part in (p.strip() for p in parts):
            at = text.find(part, end) if part else end
            if at < 0:
                raise SampleError(BAD_CONVERSATION, f"assistant text {part[:40]!r} of message {i} is not in the "
                                                    "rendered conversation")
            start = at if start is None else start
            end = at + len(part)
        spans.append((end if start is None else start, end))
    return spans


def tokenize_with_supervision(tok, msgs, template, specials: Optional[frozenset] = None):
    """Token ids of the rendered conversation (as ``apply_chat_template(tokenize=True)``) and a mask of
    the supervised tokens (the module's rule)."""
    text = render_text(tok, msgs, template)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    specials = special_ids(tok) if specials is None else specials
    mask = [False] * len(ids)
    k = 0
    for start, end in _answer_spans(tok, msgs, template, text):
        while k < len(ids) and offsets[k][1] <= start:
            k += 1
        while k < len(ids) and offsets[k][0] < end:
            mask[k] = True
            k += 1
        if k < len(ids) and ids[k] in specials:  # the end-of-turn token
            mask[k] = True
            k += 1
    return ids, mask
