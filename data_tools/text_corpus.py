"""A real-text distillation bed from text nobody on this project wrote: the Python source (code and
docstrings) of installed packages, which ships offline with the environment.

  python -m data_tools.text_corpus --out data/text_bed --seed 0
  python -m data_tools.text_corpus --out DIR --source SITE_PACKAGES --packages numpy,networkx --vocab-size 4096

Writes, deterministically given the arguments (same bytes twice):
- ``DIR/train/text-NNNNNN.tar`` and ``DIR/val/text-NNNNNN.tar``: text-only WebDataset shards, one sample
  per chunk of whole lines (``--chunk-chars``) as ``{"text": ...}`` (the LLM path: every token is
  supervised). The held-out split is BY FILE: a file's chunks all go to one split, chosen from a hash
  of the seed and the file's path. Both splits are shuffled with the seed: a train shard mixes
  packages, and an evaluation that reads only the first val batches still sees many files.
- ``DIR/tokenizer/``: a byte-level BPE (``--vocab-size``) trained on the train split only, saved as a
  Hugging Face tokenizer folder (``tokenizer: {path: DIR/tokenizer}`` in a model config).
- ``DIR/manifest.json``: per file its package, distribution, version, licence (from the package
  metadata: License-Expression, License, or the ``License ::`` classifiers), split, characters and
  tokens; per split the totals.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import sysconfig
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from taid_vlm.data.shard_writer import write_shards
from taid_vlm.errors import UserError, run_cli

DEFAULT_PACKAGES = ("numpy", "networkx", "rich", "click", "jinja2", "yaml", "tqdm", "einops", "webdataset", "typer")
MAX_FILE_BYTES = 400_000  # larger .py files are generated tables, not prose or code anyone wrote


@dataclass
class SourceFile:
    package: str          # top-level import name (folder under --source)
    path: str             # relative to --source, '/'-separated
    distribution: str
    version: str
    licence: str
    split: str = ""
    chars: int = 0
    tokens: int = 0


def licence_of(dist: metadata.Distribution) -> str:
    md = dist.metadata
    expr = (md.get("License-Expression") or "").strip()
    if expr:
        return expr
    text = (md.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 80:  # some packages paste the whole licence text here
        return text
    classifiers = [c.split("::")[-1].strip() for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        return " / ".join(classifiers)
    return (text.splitlines()[0][:80] + " ...") if text else "unknown"


def distributions_by_package(source: Path) -> Dict[str, Tuple[str, str, str]]:
    """top-level import name -> (distribution name, version, licence), from the metadata in ``source``."""
    out: Dict[str, Tuple[str, str, str]] = {}
    for dist in sorted(metadata.distributions(path=[str(source)]), key=lambda d: d.metadata["Name"] or ""):
        tops = set((dist.read_text("top_level.txt") or "").split())
        tops |= {Path(str(f)).parts[0] for f in dist.files or [] if str(f).endswith(".py")}
        for top in tops:
            out.setdefault(top, (dist.metadata["Name"], dist.version, licence_of(dist)))
    return out


def split_of(seed: int, path: str, val_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction else "train"


def find_files(source: Path, packages: Sequence[str], seed: int, val_fraction: float) -> List[SourceFile]:
    if not source.is_dir():
        raise UserError("not a folder of installed packages", f"--source {source}")
    dists = distributions_by_package(source)
    files = []
    for pkg in packages:
        root = source / pkg
        if not root.is_dir():
            raise UserError(f"package {pkg!r} not found under {source}", "--packages")
        dist, version, lic = dists.get(pkg, (pkg, "unknown", "unknown"))
        for p in sorted(root.rglob("*.py")):
            if p.stat().st_size == 0 or p.stat().st_size > MAX_FILE_BYTES:
                continue
            rel = p.relative_to(source).as_posix()
            files.append(SourceFile(pkg, rel, dist, version, lic, split_of(seed, rel, val_fraction)))
    return files


def chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """Whole lines, at most ``chunk_chars`` characters per chunk (a longer line is cut); blank chunks dropped."""
    pieces = []
    for line in text.splitlines(keepends=True):
        pieces += [line[i:i + chunk_chars] for i in range(0, len(line), chunk_chars)]
    buf = ""
    for piece in pieces:
        if buf and len(buf) + len(piece) > chunk_chars:
            if buf.strip():
                yield buf
            buf = ""
        buf += piece
    if buf.strip():
        yield buf


def train_tokenizer(texts: Sequence[str], vocab_size: int, out: Path):
    """A byte-level BPE on ``texts`` with the project's special tokens and ChatML template, saved to ``out``."""
    from transformers import PreTrainedTokenizerFast

    from taid_vlm.tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS, train_byte_level_bpe

    core = train_byte_level_bpe(texts, vocab_size, SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                  bos_token=None, unk_token=None, extra_special_tokens={"image_token": IMAGE_TOKEN})
    tok.chat_template = CHATML_TEMPLATE  # the framework checks every model's template; the data here is plain text
    tok.save_pretrained(str(out))
    return core


def build(source: Path, out: Path, packages: Sequence[str], seed: int, val_fraction: float, chunk_chars: int,
          vocab_size: int, maxcount: int = 2000) -> dict:
    files = find_files(source, packages, seed, val_fraction)
    if not files:
        raise UserError("no .py file found", f"--packages {','.join(packages)}")
    texts = {}
    for f in files:
        texts[f.path] = (source / f.path).read_text(encoding="utf-8", errors="replace")
        f.chars = len(texts[f.path])
    split_chunks: Dict[str, List[Tuple[str, str]]] = {"train": [], "val": []}
    for f in files:
        split_chunks[f.split] += [(f"{f.path[:-3]}-{i}", c) for i, c in enumerate(chunks(texts[f.path], chunk_chars))]
    if not split_chunks["train"] or not split_chunks["val"]:
        raise UserError(f"a split is empty ({len(files)} files); raise or lower --val-fraction", "--val-fraction")
    rng = random.Random(seed)
    rng.shuffle(split_chunks["train"])
    rng.shuffle(split_chunks["val"])  # evaluation reads the first batches in order: mix the held-out files
    out.mkdir(parents=True, exist_ok=True)
    core = train_tokenizer([c for _, c in split_chunks["train"]], vocab_size, out / "tokenizer")
    for f, enc in zip(files, core.encode_batch([texts[f.path] for f in files], add_special_tokens=False)):
        f.tokens = len(enc.ids)
    for split, recs in split_chunks.items():
        write_shards(((k, [], {"json": {"text": c}}) for k, c in recs), out / split, prefix="text", maxcount=maxcount)
    totals = {s: {"files": sum(f.split == s for f in files), "chunks": len(split_chunks[s]),
                  "chars": sum(f.chars for f in files if f.split == s),
                  "tokens": sum(f.tokens for f in files if f.split == s)} for s in ("train", "val")}
    licences = sorted({(f.distribution, f.version, f.licence) for f in files})
    manifest = {"source": "python source of installed packages", "packages": list(packages), "seed": seed,
                "val_fraction": val_fraction, "chunk_chars": chunk_chars, "vocab_size": vocab_size,
                "totals": totals, "distributions": [dict(zip(("name", "version", "licence"), x)) for x in licences],
                "files": [asdict(f) for f in files]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def default_source() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.text_corpus", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="output folder (train/, val/, tokenizer/, manifest.json)")
    ap.add_argument("--source", type=Path, default=None, help="site-packages folder (default: this interpreter's)")
    ap.add_argument("--packages", default=",".join(DEFAULT_PACKAGES), help="comma-separated top-level package folders")
    ap.add_argument("--seed", type=int, default=0, help="chooses the held-out files and the train order")
    ap.add_argument("--val-fraction", type=float, default=0.03, help="share of FILES held out")
    ap.add_argument("--chunk-chars", type=int, default=480, help="characters per sample (whole lines)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier build in --out")
    return ap


def _main(argv: List[str]) -> int:
    a = build_parser().parse_args(argv)
    source = a.source or default_source()
    packages = [p.strip() for p in a.packages.split(",") if p.strip()]
    if not 0 < a.val_fraction < 1:
        raise UserError(f"must be between 0 and 1, got {a.val_fraction}", "--val-fraction")
    if a.chunk_chars < 16 or a.vocab_size < 300:
        raise UserError("--chunk-chars must be >= 16 and --vocab-size >= 300", f"{a.chunk_chars}, {a.vocab_size}")
    if not source.is_dir():
        raise UserError("not a folder of installed packages", f"--source {source}")
    if (a.out / "manifest.json").exists():
        if not a.overwrite:
            raise UserError("holds an earlier build; pass --overwrite to replace it", f"--out {a.out}")
        for name in ("train", "val", "tokenizer"):
            shutil.rmtree(a.out / name, ignore_errors=True)
    elif a.out.is_dir() and any(a.out.iterdir()):  # someone else's files: never written into
        raise UserError("is not empty and holds no earlier build of this tool (no manifest.json); "
                        "choose an empty or new folder", f"--out {a.out}")
    m = build(source, a.out, packages, a.seed, a.val_fraction, a.chunk_chars, a.vocab_size)
    for s, t in m["totals"].items():
        print(f"{s}: {t['files']} files, {t['chunks']} samples, {t['chars']:,} characters, {t['tokens']:,} tokens")
    print("licences: " + "; ".join(f"{d['name']} {d['version']}: {d['licence']}" for d in m["distributions"]))
    print(f"wrote {a.out}/train, {a.out}/val, {a.out}/tokenizer, {a.out}/manifest.json")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
