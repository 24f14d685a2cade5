"""One raw WebDataset sample (``{"__key__", "jpg": bytes, "json": bytes, ...}``) -> a validated Sample.

Images are the fields named ``jpg``/``jpeg``/``png``/``webp`` (one image) or ``<i>.<ext>`` (several,
ordered by ``i``: ``0.jpg``, ``1.png``, ... as in Mantis-Instruct-like multi-image data). They are
decoded with PIL (fully, so that a truncated or corrupt file fails here, not in a worker's transform)
and converted to RGB. The text fields are parsed by formats.py. Checks: every image decodes, the text
exists, and the number of ``<image>`` markers equals the number of images.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from PIL import Image

from .formats import DEFAULT_CAPTION_INSTRUCTION, Messages, count_markers, parse_record
from .skips import (AMBIGUOUS_IMAGES, CORRUPT_IMAGE, IMAGES_IN_TEXT_ONLY, MARKER_MISMATCH,
                    SampleError)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_IMAGE_FIELD = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|png|webp)$")


@dataclass
class Sample:
    """A decoded, validated sample: images in order of their ``<image>`` markers, and either a
    conversation (``messages``) or a raw text document (``text``, LLM path)."""

    key: str
    images: List[Any] = field(default_factory=list)  # PIL.Image.Image, RGB
    messages: Optional[Messages] = None
    text: Optional[str] = None
    format: str = ""


def image_fields(raw: Dict[str, Any]) -> List[str]:
    """Names of the image fields of a raw sample, in image order."""
    numbered, plain = [], []
    for name in raw:
        m = _IMAGE_FIELD.match(name)
        if m:
            (numbered if m.group(1) is not None else plain).append((int(m.group(1) or 0), name))
    if len(plain) > 1 or (plain and numbered):
        raise SampleError(AMBIGUOUS_IMAGES, f"image fields {sorted(n for _, n in plain + numbered)}")
    return [n for _, n in sorted(plain + numbered)]


def decode_image(data: bytes):
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force the full decode: a truncated/corrupt file raises here
        return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise SampleError(CORRUPT_IMAGE, f"{type(e).__name__}: {e}"[:160]) from None


def decode_sample(
    raw: Dict[str, Any], caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION, text_only: bool = False,
    decode_images: bool = True,
) -> Sample:
    """Decode and validate; raises SampleError (with a reason) for a sample that must be skipped."""
    key = str(raw.get("__key__", "?"))
    names = image_fields(raw)
    if text_only and names:
        raise SampleError(IMAGES_IN_TEXT_ONLY, f"{len(names)} image(s) in a text-only stream")
    fields = {k: v for k, v in raw.items() if not k.startswith("__") and k not in names}
    messages, text, fmt = parse_record(fields, len(names), caption_instruction, text_only)
    n_markers = count_markers(messages) if messages is not None else 0
    if n_markers != len(names):
        raise SampleError(MARKER_MISMATCH, f"{n_markers} <image> markers, {len(names)} images")
    images = [decode_image(raw[n]) for n in names] if decode_images else [None] * len(names)
    return Sample(key=key, images=images, messages=messages, text=text, format=fmt)
