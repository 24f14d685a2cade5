"""Projectors from vision tokens ``[B, N, D]`` to LM embeddings ``[B, K, H]``, chosen by name.

A new projector is one function that returns a module with ``num_output_tokens(n_in) -> int``, and its
line in ``PROJECTORS`` (the name a config's ``projector.type`` gives) at the end of this file.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config_checks import check_keys, choose

ProjectorFactory = Callable[..., nn.Module]


def projector_names() -> list:
    return sorted(PROJECTORS)


def build_projector(cfg, vision_dim: int, llm_dim: int, grid: Optional[Tuple[int, int]], num_tokens: int,
                    where: str = "model.projector") -> nn.Module:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a mapping like {{type: mlp2x_gelu}}, got {cfg!r}")
    kind = choose(cfg.get("type"), PROJECTORS, f"{where}.type", "projector")
    options = {k: v for k, v in cfg.items() if k != "type"}
    for reserved in ("vision_dim", "llm_dim", "grid", "num_tokens", "where"):
        if reserved in options:
            raise ValueError(f"{where}.{reserved}: set by the builder, not by config")
    return PROJECTORS[kind](vision_dim=vision_dim, llm_dim=llm_dim, grid=grid, num_tokens=num_tokens,
                            where=where, **options)


class TokenwiseProjector(nn.Module):
    """Maps every vision token independently; keeps the token count."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def num_output_tokens(self, n_in: int) -> int:
        return n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _linear(vision_dim, llm_dim, grid, num_tokens, where, **options):
    check_keys(options, [], where)
    return TokenwiseProjector(nn.Linear(vision_dim, llm_dim))


def _mlp2x_gelu(vision_dim, llm_dim, grid, num_tokens, where, **options):
    check_keys(options, [], where)  # LLaVA-1.5's projector
    return TokenwiseProjector(nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)))


def shuffled_grid(grid: Tuple[int, int], factor: int) -> Tuple[int, int]:
    """Token grid after a pixel shuffle: ceil(h / f) x ceil(w / f) (odd grids are padded first)."""
    return -(-grid[0] // factor), -(-grid[1] // factor)


def pixel_shuffle(x: torch.Tensor, grid: Tuple[int, int], factor: int) -> torch.Tensor:
    """[B, h*w, D] -> [B, ceil(h/f)*ceil(w/f), D*f*f]: each f x f block of neighbouring patches becomes one token.

    A grid that f does not divide (SigLIP-so400m at 384 px / patch 14: 27 x 27) is first padded with
    zero patches at the bottom and right to a multiple of f (a bilinear resize of the feature map, as
    LLaVA-OneVision does, would alter every real patch instead); a grid that f divides is unchanged.
    Within a block the channels are ordered (row offset, column offset, channel), row-major; output
    tokens keep the row-major order of the blocks.
    """
    b, n, d = x.shape
    h, w = grid
    H, W = shuffled_grid(grid, factor)
    x = x.reshape(b, h, w, d)
    if (H * factor, W * factor) != (h, w):
        x = F.pad(x, (0, 0, 0, W * factor - w, 0, H * factor - h))
    x = x.reshape(b, H, factor, W, factor, d)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, H * W, factor * factor * d)


class PixelShuffleMLP(nn.Module):
    """InternVL-style: merge f x f patches (f=2: 4x fewer tokens), then LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, vision_dim: int, llm_dim: int, grid: Tuple[int, int], factor: int = 2):
        super().__init__()
        self.grid = tuple(grid)
        self.factor = factor
        merged = vision_dim * factor * factor
        self.mlp = nn.Sequential(nn.LayerNorm(merged), nn.Linear(merged, llm_dim), nn.GELU(),
                                 nn.Linear(llm_dim, llm_dim))

    def num_output_tokens(self, n_in: int) -> int:
        if n_in != self.grid[0] * self.grid[1]:
            raise ValueError(f"pixel_shuffle_mlp: built for a {self.grid[0]}x{self.grid[1]} grid, got {n_in} tokens")
        H, W = shuffled_grid(self.grid, self.factor)
        return H * W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.grid, self.factor))


def _pixel_shuffle_mlp(vision_dim, llm_dim, grid, num_tokens, where, factor: int = 2, **options):
    check_keys(options, [], where)
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{where}.factor: must be a positive int, got {factor!r}")
    if grid is None or grid[0] * grid[1] != num_tokens:
        raise ValueError(f"{where}.type: pixel_shuffle_mlp needs vision tokens on a grid without a CLS token "
                         f"(got {num_tokens} tokens, grid {grid}); set drop_cls: true on the vision encoder")
    return PixelShuffleMLP(vision_dim, llm_dim, grid, factor)


# config name (projector.type) -> the function that builds it
PROJECTORS: Dict[str, ProjectorFactory] = {
    "linear": _linear,
    "mlp2x_gelu": _mlp2x_gelu,
    "pixel_shuffle_mlp": _pixel_shuffle_mlp,
}
