"""A local model folder is checked before transformers reads it, so a bad one is one line naming the
config key (and with it the role: ``student.model.llm.path``) and the file, not a traceback.

- ``config.json``: present, valid JSON, a ``model_type`` this transformers knows;
- weights: ``model.safetensors`` (or the shards its index lists, or ``pytorch_model.bin``), each
  safetensors file complete (its header parsed, its data covering the file: a half-written copy fails);
- tokenizer: a vocabulary file (``tokenizer.json``, ``vocab.json`` + ``merges.txt``, ``*.model``, ...),
  without which AutoTokenizer quietly builds a tokenizer of the special tokens alone;
- processor: ``processor_config.json`` or ``preprocessor_config.json``.

``reading_folder(where, path)`` turns whatever transformers still raises while it reads the folder
into the same one line (its first line), the original kept as the cause for ``--debug``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from taid_vlm.errors import UserError

CONFIG_FILE = "config.json"
SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# A vocabulary: tokenizers' JSON, a BPE pair, WordPiece, Mistral's tekken, SentencePiece or tiktoken files.
_VOCAB_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",), ("tekken.json",))
_VOCAB_SUFFIXES = (".model", ".tiktoken")


class ModelFolderError(UserError, ValueError):
    """A model folder that cannot be loaded: ``<key>: <what is wrong>`` and the file (``where``)."""


def read_json_file(file: Path, where: str, missing: str, culprit: str):
    """The JSON in ``file``; a missing or unparsable file is one ModelFolderError (``missing`` says what is absent)."""
    if not file.is_file():
        raise ModelFolderError(f"{where}: {missing}", culprit)
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{where}: {file.name} is not valid JSON ({e})", str(file)) from None


def read_model_type(folder: Path, where: str) -> str:
    """``model_type`` of the folder's config.json, one transformers knows."""
    from transformers import CONFIG_MAPPING, __version__

    file = Path(folder) / CONFIG_FILE
    config = read_json_file(file, where, f"no {CONFIG_FILE} in the model folder", str(file))
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ModelFolderError(f"{where}: {CONFIG_FILE} names no model_type", str(file))
    if model_type not in CONFIG_MAPPING:
        raise ModelFolderError(f"{where}: model_type {model_type!r} is unknown to transformers {__version__} "
                               "(a newer transformers, or a custom model: not supported)", str(file))
    return model_type


def check_weights(folder: Path, where: str) -> None:
    """The folder's weights exist and every safetensors file among them is complete."""
    folder = Path(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        files = _indexed_shards(folder / SAFETENSORS_INDEX, where)
    elif (folder / SAFETENSORS).is_file():
        files = [folder / SAFETENSORS]
    elif (folder / TORCH_BIN).is_file() or (folder / f"{TORCH_BIN}.index.json").is_file():
        return  # torch pickles: transformers reads them (and names the file when it cannot)
    else:
        raise ModelFolderError(f"{where}: no weights in the model folder (expected {SAFETENSORS}, "
                               f"{SAFETENSORS_INDEX} or {TORCH_BIN})", str(folder))
    for file in files:
        check_safetensors(file, where)


def _indexed_shards(index: Path, where: str) -> list[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFolderError(f"{where}: {index.name} is not a safetensors index ({e!r})", str(index)) from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise ModelFolderError(f"{where}: {len(missing)} of {len(names)} weight shards listed in {index.name} "
                               f"are missing, first {missing[0]}", str(index.parent / missing[0]))
    return [index.parent / n for n in names]


def check_safetensors(file: Path, where: str) -> None:
    """The header parses and the data covers the file (reads the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        detail = str(e).removeprefix("Error while deserializing header: ")
        raise ModelFolderError(f"{where}: corrupt or truncated weights ({detail})", str(file)) from None


def check_tokenizer_files(folder: Path, where: str) -> None:
    folder = Path(folder)
    names = {p.name for p in folder.iterdir() if p.is_file()}
    if any(set(s) <= names for s in _VOCAB_SETS) or any(n.endswith(_VOCAB_SUFFIXES) for n in names):
        return
    raise ModelFolderError(f"{where}: no tokenizer vocabulary in the folder (expected tokenizer.json, "
                           "vocab.json + merges.txt, vocab.txt, a SentencePiece .model or a .tiktoken file)",
                           str(folder))


def check_processor_files(folder: Path, where: str) -> None:
    folder = Path(folder)
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise ModelFolderError(f"{where}: no image processor in the folder (expected {' or '.join(PROCESSOR_FILES)})",
                               str(folder / PROCESSOR_FILES[0]))


def check_model_folder(folder: Path, where: str) -> str:
    """config.json and the weights of a model folder; returns its model_type."""
    model_type = read_model_type(folder, where)
    check_weights(folder, where)
    return model_type


@contextlib.contextmanager
def reading_folder(where: str, folder) -> Iterator[None]:
    """Errors transformers raises while reading ``folder`` -> one ModelFolderError line (first line kept)."""
    import pickle

    import torch
    from safetensors import SafetensorError

    try:
        yield
    except (UserError, torch.OutOfMemoryError):
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        what = first if first.startswith(where) else f"{where}: cannot load the folder: {first}"
        raise ModelFolderError(what, str(folder)) from e


def load_tokenizer_checked(cfg, where: str):
    """``load_tokenizer`` with a tokenizer folder checked first and its read errors as one line."""
    from .tokenizer_loading import load_tokenizer

    folder = cfg.get("path") if isinstance(cfg, dict) else None
    if folder is None:
        return load_tokenizer(cfg, where)
    folder = Path(folder).expanduser()
    if folder.is_dir():
        check_tokenizer_files(folder, f"{where}.path")
    with reading_folder(f"{where}.path", folder):
        return load_tokenizer(cfg, where)
