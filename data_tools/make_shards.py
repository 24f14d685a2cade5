"""Build WebDataset shards from common layouts.

  python -m data_tools.make_shards --out DIR --image-folder IMAGES        # image + same-stem .txt
  python -m data_tools.make_shards --out DIR --jsonl DATA.jsonl [--image-root DIR]
        # lines: {"image": p | "images": [p, ...], "caption": ...} or {..., "conversations"|"messages": [...]}
  python -m data_tools.make_shards --out DIR --llava-json LLAVA.json --image-root DIR
  python -m data_tools.make_shards --out DIR --text-jsonl TEXT.jsonl      # {"text": ...} or {"messages": [...]}

Writes ``DIR/<prefix>-000000.tar ...`` (``--maxcount``, ``--maxsize``) with webdataset's ShardWriter and
reports how many samples were written and how many skipped, by reason (missing image file, image that
does not decode, missing text, marker/image count mismatch ...). Sample layout: one image as ``jpg``
(or its own extension), several as ``0.jpg``, ``1.png`` ...; the text as ``txt`` (captions) or
``json``. img2dataset output needs no conversion: the training pipeline reads it directly.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from PIL import Image

from taid_vlm.data.formats import count_markers, llava_messages, openai_messages
from taid_vlm.data.samples import IMAGE_EXTS
from taid_vlm.data.shard_writer import write_shards  # noqa: F401 (the shard writer lives in the package)
from taid_vlm.data.skips import (BAD_JSON, CORRUPT_IMAGE, MARKER_MISMATCH, MISSING_IMAGE, MISSING_TEXT,
                                 SampleError)

# (key, [(ext, bytes)], fields) where fields maps "txt"/"json" to str/dict
Record = Tuple[str, List[Tuple[str, bytes]], Dict[str, Any]]


def _ext(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def load_image(path: Path, verify: bool = True) -> Tuple[str, bytes]:
    if not path.is_file():
        raise SampleError(MISSING_IMAGE, f"no such image file: {path}")
    ext = _ext(str(path))
    if ext not in IMAGE_EXTS:
        raise SampleError(CORRUPT_IMAGE, f"unsupported image type: {path}")
    data = path.read_bytes()
    if verify:
        try:
            Image.open(io.BytesIO(data)).verify()  # header + structure check, without a full decode
        except Exception as e:
            raise SampleError(CORRUPT_IMAGE, f"{path}: {e}") from None
    return ext, data


def _check_markers(images: list, fields: dict) -> None:
    meta = fields.get("json") or {}
    msgs = None
    if "conversations" in meta:
        msgs = llava_messages(meta["conversations"])
    elif "messages" in meta:
        msgs = openai_messages(meta["messages"])
    if msgs is not None and count_markers(msgs) != len(images):
        raise SampleError(MARKER_MISMATCH, f"{count_markers(msgs)} <image> markers, {len(images)} images")


# -- sources -----------------------------------------------------------------------------------------
def from_image_folder(folder: Path, verify: bool = True) -> Iterator[Any]:
    for img in sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
        key = str(img.relative_to(folder).with_suffix(""))
        try:
            txt = img.with_suffix(".txt")
            if not txt.is_file() or not txt.read_text(encoding="utf-8").strip():
                raise SampleError(MISSING_TEXT, f"no caption file {txt}")
            yield key, [load_image(img, verify)], {"txt": txt.read_text(encoding="utf-8").strip()}
        except SampleError as e:
            yield key, e


def _jsonl(path: Path) -> Iterator[Tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except ValueError as e:
                yield i, SampleError(BAD_JSON, f"line {i + 1}: {e}")


def _record_images(rec: dict, root: Path, verify: bool) -> List[Tuple[str, bytes]]:
    paths = rec.get("images", rec.get("image"))
    if paths is None:
        return []
    paths = [paths] if isinstance(paths, str) else list(paths)
    return [load_image(root / p, verify) for p in paths]


def _record(i: int, rec: Any, root: Path, verify: bool, text_only: bool = False):
    if isinstance(rec, SampleError):
        return str(i), rec
    key = str(rec.get("id", rec.get("key", i))) if isinstance(rec, dict) else str(i)
    try:
        if not isinstance(rec, dict):
            raise SampleError(BAD_JSON, f"line {i + 1} is not an object")
        images = [] if text_only else _record_images(rec, root, verify)
        meta = {k: v for k, v in rec.items() if k in ("conversations", "messages", "caption", "text")}
        if not meta:
            raise SampleError(MISSING_TEXT, "no conversations/messages/caption/text")
        if text_only and "text" not in meta and "messages" not in meta:
            raise SampleError(MISSING_TEXT, "text JSONL line needs `text` or `messages`")
        fields: Dict[str, Any] = {"json": meta}
        _check_markers(images, fields)
        if "caption" in meta and not images:
            raise SampleError(MISSING_IMAGE, "caption without image")
        return key, (key, images, fields)
    except SampleError as e:
        return key, e


def from_jsonl(path: Path, image_root: Optional[Path], verify: bool = True) -> Iterator[Any]:
    root = image_root or path.parent
    for i, rec in _jsonl(path):
        key, out = _record(i, rec, root, verify)
        yield out if not isinstance(out, SampleError) else (key, out)


def from_text_jsonl(path: Path) -> Iterator[Any]:
    for i, rec in _jsonl(path):
        key, out = _record(i, rec, path.parent, False, text_only=True)
        yield out if not isinstance(out, SampleError) else (key, out)


def from_llava_json(path: Path, image_root: Path, verify: bool = True) -> Iterator[Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a JSON list of LLaVA records")
    for i, rec in enumerate(data):
        key, out = _record(i, rec, image_root, verify)
        yield out if not isinstance(out, SampleError) else (key, out)


# -- writing -----------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.make_shards", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-folder", type=Path, help="images with same-stem .txt captions")
    src.add_argument("--jsonl", type=Path, help="JSONL with image path(s) and caption or conversations/messages")
    src.add_argument("--llava-json", type=Path, help="LLaVA JSON list (id, image, conversations)")
    src.add_argument("--text-jsonl", type=Path, help="text-only JSONL: text or messages")
    ap.add_argument("--image-root", type=Path, help="image paths are relative to this (default: the JSON's folder)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    ap.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    ap.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    ap.add_argument("--no-verify", action="store_true", help="do not check that images decode")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    a = ap.parse_args(argv)
    verify = not a.no_verify
    if a.image_folder:
        if not a.image_folder.is_dir():
            ap.error(f"--image-folder {a.image_folder} is not a folder")
        recs = from_image_folder(a.image_folder, verify)
    elif a.jsonl:
        recs = from_jsonl(a.jsonl, a.image_root, verify)
    elif a.llava_json:
        if a.image_root is None:
            ap.error("--llava-json needs --image-root")
        recs = from_llava_json(a.llava_json, a.image_root, verify)
    else:
        recs = from_text_jsonl(a.text_jsonl)
    for p in (a.jsonl, a.llava_json, a.text_jsonl):
        if p is not None and not p.is_file():
            ap.error(f"{p} does not exist")
    report = write_shards(recs, a.out, a.prefix, a.maxcount, a.maxsize)
    if a.json:
        print(json.dumps(report))
    else:
        print(f"wrote {report['written']} samples into {len(report['shards'])} shards in {a.out}; "
              f"skipped {report['skipped']}")
        for r, n in report["skipped_by_reason"].items():
            print(f"  {r}: {n}  e.g. {', '.join(report['skipped_examples'].get(r, []))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
