"""Save / load / export.

A saved model is a folder:
    taid_model.json     the YAML-shaped config that rebuilds it (paths relative to the folder)
    llm/                composed and text-only models: the LM as a standalone Hugging Face model + tokenizer
                        (``AutoModelForCausalLM.from_pretrained(<dir>/llm)`` works)
    model.safetensors   composed models: the vision encoder and projector weights
    hf_model/           native HF VLMs: ``save_pretrained`` output + tokenizer + image processor
The folder is written next to its destination and renamed into place, so a crash leaves the last good copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .saving import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, save_model, write_model_files  # noqa: F401 (re-exported)


def _resolve(path_value, directory: Path):
    if path_value is None or os.path.isabs(str(path_value)):
        return path_value
    return str(directory / path_value)


def load_model(directory: Union[str, Path], role: str = "student", where: Optional[str] = None):
    """Rebuild a model saved by ``save_pretrained``; outputs are bit-identical to the saved model's.
    ``where`` names the folder in errors (default ``<role>.model.saved``)."""
    from safetensors.torch import load_file

    from .builder import build_model
    from .folder_checks import ModelFolderError, check_safetensors, read_json_file

    directory, where = Path(directory), where or f"{role}.model.saved"
    cfg_file = directory / CONFIG_FILE
    payload = read_json_file(cfg_file, where, f"not a saved taid-vlm model (no {CONFIG_FILE})", str(directory))
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{where}: format_version {payload.get('format_version')!r}; expected {FORMAT_VERSION}",
                               str(cfg_file))
    cfg = payload["model"]
    cfg["path"] = _resolve(cfg.get("path"), directory) if "path" in cfg else None
    if cfg["path"] is None:
        cfg.pop("path")
    for section in ("tokenizer", "llm", "vision"):
        if isinstance(cfg.get(section), dict) and cfg[section].get("path") is not None:
            cfg[section]["path"] = _resolve(cfg[section]["path"], directory)
    model = build_model(cfg, role=role, where=where)
    weights = directory / WEIGHTS_FILE
    if cfg.get("type") == "composed" and not weights.is_file():  # else: a random vision tower and projector
        raise ModelFolderError(f"{where}: no {WEIGHTS_FILE} (the vision tower and projector weights)", str(weights))
    if weights.is_file():
        check_safetensors(weights, where)
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("llm.")]  # the LM came from llm/
        if missing or unexpected:
            raise ModelFolderError(f"{where}: the weights do not fit the model: missing {missing[:8]}, "
                                   f"unexpected {unexpected[:8]}", str(weights))
    return model
