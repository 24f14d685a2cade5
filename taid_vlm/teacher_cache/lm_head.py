"""The teacher's lm_head, stored once per hidden-state cache (``lm_head.safetensors``, tensor ``weight``
[V, H] in the teacher's dtype), and loaded at most once per process and device.

Batches of a hidden-state cache carry an ``LMHead`` (a file reference: small, picklable, so it rides
through data-loader workers); ``weight(device)`` gives the tensor. With the hidden states stored in the
teacher's dtype, ``hidden @ weight.T`` is the online teacher's computation itself: the cached loss is
the online loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple

import torch

FILE = "lm_head.safetensors"
_LOADED: Dict[Tuple[str, str, int], torch.Tensor] = {}


def save_lm_head(folder, weight: torch.Tensor) -> dict:
    """Write ``weight`` atomically into ``folder/lm_head.safetensors``; its manifest entry."""
    from safetensors.torch import save_file

    path = Path(folder) / FILE
    tmp = path.with_name(FILE + ".tmp")
    save_file({"weight": weight.detach().to("cpu").contiguous()}, str(tmp))
    os.replace(tmp, path)
    return {"file": FILE, "shape": list(weight.shape), "dtype": str(weight.dtype).replace("torch.", ""),
            "bytes": path.stat().st_size}


class LMHead:
    """Reference to a cache's lm_head file; ``weight(device)`` loads it once per process and device."""

    def __init__(self, folder, entry: dict):
        self.path = str(Path(folder) / entry["file"])
        self.shape, self.dtype = tuple(entry["shape"]), entry["dtype"]

    def weight(self, device) -> torch.Tensor:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"teacher cache: {self.path} (the teacher's lm_head) is missing")
        key = (self.path, str(device), os.stat(self.path).st_mtime_ns)  # a rewritten cache is read again
        if key not in _LOADED:
            from safetensors.torch import load_file

            w = load_file(self.path)["weight"]
            if tuple(w.shape) != self.shape or str(w.dtype).replace("torch.", "") != self.dtype:
                raise ValueError(f"teacher cache: {self.path} holds {tuple(w.shape)} {w.dtype}, the manifest says "
                                 f"{self.shape} {self.dtype}")
            _LOADED[key] = w.to(device)
        return _LOADED[key]

    def __repr__(self) -> str:
        return f"LMHead({self.path}, {self.shape}, {self.dtype})"
