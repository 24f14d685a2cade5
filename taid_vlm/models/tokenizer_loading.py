"""Tokenizer from config: the built-in tiny tokenizer or a local Hugging Face folder (no hub access)."""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path
from typing import Any

from .config_checks import check_keys, choose

BUILTIN_TOKENIZERS = ("tiny",)

# Files a Hugging Face tokenizer folder may load from (a model folder also holds weights: never hashed).
_TOKENIZER_FILE_HINTS = ("token", "vocab", "merges", "special", "chat_template", "added", ".model", ".tiktoken")
# Tokenizers loaded in this process, by the content of their files: teacher and student of one family
# usually ship byte-identical tokenizers in different folders, and a Qwen2 tokenizer holds ~144 MB of
# resident memory (measured: benchmarks/peer_bench.py's student and teacher folders). Weak values: a
# tokenizer lives as long as a model that uses it. Nothing in taid_vlm mutates a loaded tokenizer
# (image tokens must already be in it, see image_token_id), so sharing one object is safe.
_LOADED: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


def tokenizer_fingerprint(path: Path) -> str:
    """sha256 over the names and bytes of the folder's tokenizer files (not its weights), and the model
    type in its config.json, from which AutoTokenizer picks a class when tokenizer_config.json names none."""
    import json

    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        try:
            digest.update(str(json.loads(config.read_text()).get("model_type")).encode() + b"\0")
        except (ValueError, AttributeError):
            digest.update(config.read_bytes())
    for f in sorted(p for p in path.iterdir() if p.is_file() and any(h in p.name.lower() for h in _TOKENIZER_FILE_HINTS)):
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def load_tokenizer(cfg: Any, where: str = "model.tokenizer"):
    """``{builtin: tiny[, vocab_size: 512]}`` or ``{path: DIR}``."""
    cfg = check_keys(cfg, ["builtin", "path", "vocab_size"], where)
    if (cfg.get("builtin") is None) == (cfg.get("path") is None):
        raise ValueError(f"{where}: set exactly one of 'builtin' or 'path' (got {cfg})")
    if cfg.get("builtin") is not None:
        choose(cfg["builtin"], BUILTIN_TOKENIZERS, f"{where}.builtin", "builtin tokenizer")
        from taid_vlm.tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer(vocab_size=int(cfg.get("vocab_size") or 512))
    if cfg.get("vocab_size") is not None:
        raise ValueError(f"{where}.vocab_size: only valid with 'builtin'")
    path = Path(cfg["path"]).expanduser()
    if not path.is_dir():
        raise ValueError(f"{where}.path: {str(path)!r} is not a local directory")
    key = tokenizer_fingerprint(path)
    tokenizer = _LOADED.get(key)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        _LOADED[key] = tokenizer
    return tokenizer


def image_token_id(tokenizer, image_token: str, where: str) -> int:
    """Id of the image placeholder; it must be a single token already in the vocabulary.

    Adding it here would silently make teacher and student vocabularies differ, so a missing token is an
    error: add it to the tokenizer folder once (and resize the LM) before distilling.
    """
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(image_token)
    if len(ids) != 1 or tid is None or tid == tokenizer.unk_token_id or ids[0] != tid:
        raise ValueError(
            f"{where}: image token {image_token!r} is not a single token of tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} (encodes to {ids}); "
            "add it as a special token to the tokenizer first"
        )
    return int(tid)
