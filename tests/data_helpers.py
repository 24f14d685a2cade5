"""Helpers for the data tests: tiny InputSpecs, tiny images, shards written with webdataset."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List

import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from taid_vlm.spec import InputSpec
from taid_vlm.tokenizer import IMAGE_TOKEN


def teacher_spec(tok, chat_template=None) -> InputSpec:
    return InputSpec(tok, T.Compose([T.Resize((32, 32)), T.ToTensor()]), tokens_per_image=16,
                     image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), image_token=IMAGE_TOKEN,
                     chat_template=chat_template)


def student_spec(tok, chat_template=None) -> InputSpec:
    return InputSpec(tok, T.Compose([T.Resize((24, 24)), T.ToTensor()]), tokens_per_image=4,
                     image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), image_token=IMAGE_TOKEN,
                     chat_template=chat_template)


def text_spec(tok) -> InputSpec:
    return InputSpec(tok)


def jpg(color=(200, 30, 30), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def png(color=(30, 30, 200), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def caption_sample(key: str, text: str, color=(200, 30, 30)) -> Dict[str, Any]:
    return {"__key__": key, "jpg": jpg(color), "txt": text.encode()}


def conv_sample(key: str, n_images: int, answer: str = "red circle") -> Dict[str, Any]:
    markers = "".join("<image>\n" for _ in range(n_images))
    conv = [{"from": "human", "value": markers + "What color is it?"}, {"from": "gpt", "value": answer}]
    s: Dict[str, Any] = {"__key__": key, "json": json.dumps({"conversations": conv}).encode()}
    for i in range(n_images):
        s[f"{i}.jpg" if n_images > 1 else "jpg"] = jpg((40 * i % 255, 100, 50))
    return s


def write_tar(path: Path, samples: List[Dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as w:
        for s in samples:
            w.write(s)
    return str(path)


def write_caption_shards(folder: Path, n_shards: int, per_shard: int, prefix: str = "shard") -> List[str]:
    paths = []
    for s in range(n_shards):
        samples = [caption_sample(f"s{s}_{i:03d}", f"shape number {s * per_shard + i}") for i in range(per_shard)]
        paths.append(write_tar(folder / f"{prefix}-{s:06d}.tar", samples))
    return paths
