"""Tokenizer from config: the built-in tiny tokenizer or a local Hugging Face folder (no hub access)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config_checks import check_keys, choose

BUILTIN_TOKENIZERS = ("tiny",)


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
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


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
