"""Writing a model folder atomically (the layout is described in io.py). Kept apart from loading, which
needs the builder: the models call ``save_model`` and the builder builds the models, one way only."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from taid_vlm.folders import apply_umask, move_into_place

CONFIG_FILE = "taid_model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def save_model(model, directory: Union[str, Path], state_dict: Optional[dict] = None) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write_model_files(model, tmp, state_dict)
        apply_umask(tmp)  # mkdtemp makes it 0700 and safetensors writes 0600 files
        move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def write_model_files(model, directory: Path, state_dict: Optional[dict] = None) -> None:
    """The files of a saved model, written into the existing folder ``directory`` as they are (no swap)."""
    model.write_weights(Path(directory), state_dict)
    payload = {"format_version": FORMAT_VERSION, "model": model.export_config()}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
