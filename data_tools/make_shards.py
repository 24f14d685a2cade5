"""Build WebDataset shards from common layouts.

  python -m data_tools.make_shards --out DIR --image-folder IMAGES        # image + same-stem .txt
  python -m data_tools.make_shards --out DIR --jsonl DATA.jsonl [--image-root DIR]
        # lines: {"image": p | "images": [p, ...], "caption": ...} or {..., "conversations"|"messages": [...]}
  python -m data_tools.make_shards --out DIR --llava-json LLAVA.json --image-root DIR
  python -m data_tools.make_shards --out DIR --text-jsonl TEXT.jsonl      # {"text": ...} or {"messages": [...]}

Writes ``DIR/<prefix>-000000.tar ...`` (``--maxcount``, ``--maxsize``) with webdataset's ShardWriter and
reports how many inputs were read, how many samples written and how many skipped, by reason (missing
image file, image that does not decode, missing text or answer, marker/image count mismatch ...).
Every sample is validated by the training loader's own code (taid_vlm.data.samples.decode_sample: full
image decode, a non-empty answer, one image per ``<image>`` marker) on the exact bytes written, so what
make_shards writes, check_shards and the loader accept. Sample layout: one image as ``jpg`` (or its
own extension), several as ``0.jpg``, ``1.png`` ...; the text as ``txt`` (captions) or ``json``.
img2dataset output needs no conversion: the training pipeline reads it directly (index it once with
data_tools.index_shards). The shard index (``<shard>.idx`` + ``shards.index.json``) is written beside
the shards.

A non-empty ``--out`` is refused unless ``--overwrite``. With ``--overwrite`` the new shards are written
into a temporary folder inside ``--out`` first; only when that succeeded are the old files named like
this tool's own shards (``<prefix>-NNNNNN.tar``) removed and the new ones moved in. Nothing else in
``--out`` is touched (other files are listed in the report), and a failed or empty run leaves the old
shards as they were. No usable sample at all is an error (exit status 2). ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from taid_vlm.data.samples import IMAGE_EXTS, decode_sample
from taid_vlm.data.shard_index import SUMMARY_NAME, build_index, write_index
from taid_vlm.data.shard_writer import raw_sample, write_shards
from taid_vlm.data.skips import BAD_JSON, CORRUPT_IMAGE, MISSING_IMAGE, MISSING_TEXT, SampleError
from taid_vlm.errors import UserError, run_cli

# (key, [(ext, bytes)], fields) where fields maps "txt"/"json" to str/dict
Record = Tuple[str, List[Tuple[str, bytes]], Dict[str, Any]]


def _ext(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def load_image(path: Path) -> Tuple[str, bytes]:
    """The field extension and bytes of an image file (whether it decodes is checked by ``validated``)."""
    if not path.is_file():
        raise SampleError(MISSING_IMAGE, f"no such image file: {path}")
    ext = _ext(str(path))
    if ext not in IMAGE_EXTS:
        raise SampleError(CORRUPT_IMAGE, f"unsupported image type: {path}")
    return ext, path.read_bytes()


# -- sources -----------------------------------------------------------------------------------------
def from_image_folder(folder: Path) -> Iterator[Any]:
    for img in sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
        key = str(img.relative_to(folder).with_suffix(""))
        try:
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                raise SampleError(MISSING_TEXT, f"no caption file {txt}")
            yield key, [load_image(img)], {"txt": txt.read_text(encoding="utf-8").strip()}
        except (SampleError, UnicodeDecodeError) as e:
            yield key, e if isinstance(e, SampleError) else SampleError(MISSING_TEXT, f"{txt}: not utf-8")


def _jsonl(path: Path) -> Iterator[Tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except ValueError as e:
                yield i, SampleError(BAD_JSON, f"line {i + 1}: {e}")


def _record_images(rec: dict, root: Path) -> List[Tuple[str, bytes]]:
    paths = rec.get("images", rec.get("image"))
    if paths is None:
        return []
    paths = [paths] if isinstance(paths, str) else list(paths)
    return [load_image(root / p) for p in paths]


def _record(i: int, rec: Any, root: Path, text_only: bool = False):
    if isinstance(rec, SampleError):
        return str(i), rec
    key = str(rec.get("id", rec.get("key", i))) if isinstance(rec, dict) else str(i)
    try:
        if not isinstance(rec, dict):
            raise SampleError(BAD_JSON, f"line {i + 1} is not an object")
        images = [] if text_only else _record_images(rec, root)
        meta = {k: v for k, v in rec.items() if k in ("conversations", "messages", "caption", "text")}
        if not meta:
            raise SampleError(MISSING_TEXT, "no conversations/messages/caption/text")
        if text_only and "text" not in meta and "messages" not in meta:
            raise SampleError(MISSING_TEXT, "text JSONL line needs `text` or `messages`")
        return key, (key, images, {"json": meta})
    except SampleError as e:
        return key, e


def from_jsonl(path: Path, image_root: Optional[Path]) -> Iterator[Any]:
    root = image_root or path.parent
    for i, rec in _jsonl(path):
        key, out = _record(i, rec, root)
        yield out if not isinstance(out, SampleError) else (key, out)


def from_text_jsonl(path: Path) -> Iterator[Any]:
    for i, rec in _jsonl(path):
        key, out = _record(i, rec, path.parent, text_only=True)
        yield out if not isinstance(out, SampleError) else (key, out)


def from_llava_json(path: Path, image_root: Path) -> Iterator[Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"not valid JSON: {e}", str(path)) from None
    if not isinstance(data, list):
        raise UserError("expected a JSON list of LLaVA records", str(path))
    for i, rec in enumerate(data):
        key, out = _record(i, rec, image_root)
        yield out if not isinstance(out, SampleError) else (key, out)


# -- validation: the loader's own decode on the bytes that will be written ----------------------------
def validated(records: Iterable[Any], text_only: bool = False, decode_images: bool = True) -> Iterator[Any]:
    """Pass records through, turning every one the training loader would skip into ``(key, SampleError)``."""
    for rec in records:
        if not isinstance(rec[1], SampleError):
            try:
                decode_sample(raw_sample(*rec), text_only=text_only, decode_images=decode_images)
            except SampleError as e:
                rec = (rec[0], e)
        yield rec


# -- writing (the shard writer itself lives in the package: taid_vlm.data.shard_writer) -------------
TMP_PREFIX = ".make_shards-"


def own_shard_pattern(prefix: str) -> re.Pattern:
    """File names this tool writes for ``prefix``: the only files ``--overwrite`` may remove."""
    return re.compile(rf"^({re.escape(prefix)}-\d{{6}}\.tar(\.idx)?|{re.escape(SUMMARY_NAME)})$")  # shards + index


def _is_own(p: Path, own: re.Pattern) -> bool:
    """One of our shards, or the temporary folder of an interrupted earlier run."""
    return (p.is_file() and bool(own.match(p.name))) or (p.is_dir() and p.name.startswith(TMP_PREFIX))


def write_into(records: Iterable[Any], out: Path, prefix: str = "shard", maxcount: int = 10000,
               maxsize: float = 1e9, overwrite: bool = False) -> Dict[str, Any]:
    """write_shards with the output folder policy of the module docstring."""
    if out.exists() and not out.is_dir():
        raise UserError("not a folder", f"--out {out}")
    existing = sorted(out.iterdir()) if out.is_dir() else []
    if existing and not overwrite:
        raise UserError(f"output folder is not empty ({len(existing)} entries, e.g. {existing[0].name}); "
                        "pass --overwrite to replace its shards", f"--out {out}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out))
    try:
        report = write_shards(records, tmp, prefix, maxcount, maxsize, index=False)  # indexed once moved
        if report["written"] == 0:
            return report  # nothing replaced: the caller reports the error
        own = own_shard_pattern(prefix)
        replaced = [p for p in existing if _is_own(p, own)]
        for p in replaced:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        moved = []
        for s in report["shards"]:
            dest = out / Path(s).name
            os.replace(s, dest)
            moved.append(str(dest))
        report["shards"] = moved
        write_index([build_index(p) for p in moved])  # the loader's start-up reads this, never the shards
        report["replaced"] = sum(p.name.endswith(".tar") for p in replaced)  # shards, not their index files
        report["kept_other_files"] = sorted(p.name for p in existing if p not in replaced)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.make_shards", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-folder", type=Path, help="images with same-stem .txt captions")
    src.add_argument("--jsonl", type=Path, help="JSONL with image path(s) and caption or conversations/messages")
    src.add_argument("--llava-json", type=Path, help="LLaVA JSON list (id, image, conversations)")
    src.add_argument("--text-jsonl", type=Path, help="text-only JSONL: text or messages")
    ap.add_argument("--image-root", type=Path, help="image paths are relative to this (default: the JSON's folder)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the shards (<prefix>-NNNNNN.tar) already in --out; other files are kept")
    ap.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    ap.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    ap.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the full image decode (faster; the loader will still skip images that do not decode)")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return ap


def _check_input(path: Optional[Path], flag: str, folder: bool = False) -> None:
    if path is None:
        return
    if folder and not path.is_dir():
        raise UserError("not a folder" if path.exists() else "no such folder", f"{flag} {path}")
    if not folder and not path.is_file():
        raise UserError("not a file" if path.exists() else "no such file", f"{flag} {path}")


def _main(argv: List[str]) -> int:
    a = build_parser().parse_args(argv)
    if a.maxcount < 1 or a.maxsize <= 0:
        raise UserError("must be positive", "--maxcount/--maxsize")
    _check_input(a.image_folder, "--image-folder", folder=True)
    _check_input(a.image_root, "--image-root", folder=True)
    for flag, p in (("--jsonl", a.jsonl), ("--llava-json", a.llava_json), ("--text-jsonl", a.text_jsonl)):
        _check_input(p, flag)
    verify = not a.no_verify
    if a.image_folder:
        recs, where = from_image_folder(a.image_folder), f"--image-folder {a.image_folder}"
    elif a.jsonl:
        recs, where = from_jsonl(a.jsonl, a.image_root), f"--jsonl {a.jsonl}"
    elif a.llava_json:
        if a.image_root is None:
            raise UserError("--llava-json needs --image-root", f"--llava-json {a.llava_json}")
        recs, where = from_llava_json(a.llava_json, a.image_root), f"--llava-json {a.llava_json}"
    else:
        recs, where = from_text_jsonl(a.text_jsonl), f"--text-jsonl {a.text_jsonl}"
    recs = validated(recs, text_only=a.text_jsonl is not None, decode_images=verify)
    report = write_into(recs, a.out, a.prefix, a.maxcount, a.maxsize, overwrite=a.overwrite)
    if a.json:
        print(json.dumps(report))
    else:
        print(f"read {report['inputs']} inputs: wrote {report['written']} samples into {len(report['shards'])} "
              f"shards in {a.out}; skipped {report['skipped']}")
        for r, n in report["skipped_by_reason"].items():
            print(f"  skipped {r}: {n}  e.g. {', '.join(report['skipped_examples'].get(r, []))}")
        if report.get("replaced"):
            print(f"  replaced {report['replaced']} old shards")
        if report.get("kept_other_files"):
            print(f"  left untouched in {a.out}: {', '.join(report['kept_other_files'][:10])}")
    if report["written"] == 0:
        why = "no input found" if report["inputs"] == 0 else f"all {report['inputs']} inputs were skipped"
        raise UserError(f"no usable sample: {why}; nothing written", where)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status (2 and one ``error:`` line for a user error)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
