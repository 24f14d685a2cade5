"""The vision encoder interface every tower implements.

Every encoder returns patch tokens ``[B, N, D]`` (not a pooled vector), says how many tokens an image
gives (``num_tokens``) and on what grid (``grid``, needed by pixel-shuffle projectors), and owns the image
transform (PIL -> [3, H, W]) that the data pipeline must apply for it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn


class VisionEncoder(nn.Module):
    hidden_size: int
    num_tokens: int
    grid: Optional[Tuple[int, int]]  # (rows, cols) of the patch tokens; None if they do not form a grid
    image_size: Tuple[int, int]  # (H, W) of the pixel tensors the encoder expects
    image_transform: Callable[[Any], torch.Tensor]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D]
        raise NotImplementedError

    def export_config(self) -> dict:
        """A self-contained config that rebuilds this architecture with no weights and no local files."""
        raise NotImplementedError

    def unused_parameters(self):
        """Parameters that do not feed the selected feature layer (kept so checkpoints still load)."""
        return []


def check_feature_layer(value: Any, num_layers: int, where: str) -> int:
    """Absolute index (0-based block) of the feature layer; negative counts from the end (-1: last block)."""
    if not isinstance(value, int) or isinstance(value, bool) or not -num_layers <= value < num_layers:
        raise ValueError(f"{where}: feature layer must be an int in [{-num_layers}, {num_layers - 1}], got {value!r}")
    return value % num_layers
