"""Record layouts -> one canonical form: a list of ``{"role", "content"}`` messages, or a raw document.

Accepted layouts (fields of one WebDataset sample, after the images are taken out):

- captions: ``txt`` and/or ``json`` with ``caption`` (this is what img2dataset writes: jpg + txt + json
  with url/key/status/caption). Becomes ``user: "<image>\\n" + instruction``, ``assistant: caption``.
- LLaVA conversations: ``json`` with ``conversations: [{"from": "human"|"gpt"|"system", "value": ...}]``,
  ``<image>`` markers inside the values.
- OpenAI messages: ``json`` with ``messages: [{"role", "content"}]``; ``content`` is a string or a list
  of parts (``{"type": "text", "text"}`` / ``{"type": "image"}`` / ``{"type": "image_url", ...}``); an
  image part becomes an ``<image>`` marker, parts are joined with newlines.
- text-only: ``json`` with ``messages`` (no images) or ``text``, or a bare ``txt`` (LLM path only).

Canonical content is a plain string; images are referred to by the marker ``IMAGE_MARKER`` in order of
appearance. Rendering (render.py) turns each marker into the model's own image token(s).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from .skips import BAD_CONVERSATION, BAD_JSON, MISSING_IMAGE, MISSING_TEXT, SampleError

IMAGE_MARKER = "<image>"
DEFAULT_CAPTION_INSTRUCTION = "Describe the image briefly."

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system", "bot": "assistant", "model": "assistant"}
_ROLES = {"system", "user", "assistant"}

Messages = List[Dict[str, str]]


def caption_messages(caption: str, instruction: str = DEFAULT_CAPTION_INSTRUCTION) -> Messages:
    """A caption record as a one-turn conversation: the instruction asks, the caption answers."""
    return [{"role": "user", "content": f"{IMAGE_MARKER}\n{instruction}"},
            {"role": "assistant", "content": caption.strip()}]


def llava_messages(conversations: Any) -> Messages:
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(BAD_CONVERSATION, "`conversations` is not a non-empty list")
    out = []
    for turn in conversations:
        if not isinstance(turn, dict) or "value" not in turn:
            raise SampleError(BAD_CONVERSATION, f"turn without `value`: {str(turn)[:80]}")
        role = _LLAVA_ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None or not isinstance(turn["value"], str):
            raise SampleError(BAD_CONVERSATION, f"bad turn: {str(turn)[:80]}")
        out.append({"role": role, "content": turn["value"]})
    return out


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url", "input_image"):
                parts.append(IMAGE_MARKER)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(part.get("text", "")))
            else:
                raise SampleError(BAD_CONVERSATION, f"unknown content part: {str(part)[:80]}")
        return "\n".join(parts)
    raise SampleError(BAD_CONVERSATION, f"content is neither a string nor a list: {type(content).__name__}")


def openai_messages(messages: Any) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise SampleError(BAD_CONVERSATION, "`messages` is not a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or "content" not in m:
            raise SampleError(BAD_CONVERSATION, f"bad message: {str(m)[:80]}")
        out.append({"role": m["role"], "content": _content_text(m["content"])})
    return out


def count_markers(messages: Messages) -> int:
    return sum(m["content"].count(IMAGE_MARKER) for m in messages)


def parse_record(
    fields: Dict[str, bytes], n_images: int, caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION,
    text_only: bool = False,
) -> Tuple[Optional[Messages], Optional[str], str]:
    """Return ``(messages, text, format_name)``; exactly one of messages/text is set.

    ``fields`` holds the non-image fields of a sample (``json``, ``txt`` ...) as bytes.
    Raises SampleError for records that cannot be used.
    """
    meta: Dict[str, Any] = {}
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleError(BAD_JSON, str(e)[:120]) from None
        if not isinstance(meta, dict):
            raise SampleError(BAD_JSON, f"top level is {type(meta).__name__}, not an object")
    txt = None
    if "txt" in fields:
        try:
            txt = fields["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise SampleError(MISSING_TEXT, "txt is not utf-8") from None

    if "conversations" in meta:
        msgs, fmt = llava_messages(meta["conversations"]), "llava"
    elif "messages" in meta:
        msgs, fmt = openai_messages(meta["messages"]), "openai"
    elif n_images > 0 or (not text_only and ("caption" in meta or (txt is not None and "text" not in meta))):
        caption = meta.get("caption") if isinstance(meta.get("caption"), str) and meta["caption"].strip() else txt
        if caption is None or not caption.strip():
            raise SampleError(MISSING_TEXT, "caption record without caption text")
        if n_images == 0:
            raise SampleError(MISSING_IMAGE, "caption record without an image")
        return caption_messages(caption, caption_instruction), None, "caption"
    elif isinstance(meta.get("text"), str):
        if not meta["text"].strip():
            raise SampleError(MISSING_TEXT, "empty `text`")
        return None, meta["text"], "text"
    elif txt is not None:
        if not txt.strip():
            raise SampleError(MISSING_TEXT, "empty txt")
        return None, txt, "text"
    else:
        if "json" in fields:
            raise SampleError(BAD_JSON, "json has none of conversations/messages/caption/text")
        raise SampleError(MISSING_TEXT, f"no text field (have: {sorted(fields)})")

    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise SampleError(MISSING_TEXT, "conversation without an assistant answer")
    return msgs, None, fmt
