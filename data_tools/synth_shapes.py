"""A synthetic image-text set: colored shapes on a plain background, deterministic for a seed.

  python -m data_tools.synth_shapes --out DIR --n 1000 --seed 0 [--size 64] [--val-fraction 0.1]

Each image holds 1-3 shapes (circle, square, triangle) of distinct colors in distinct cells of a 3x3
grid; positions are named (top left, center, bottom right ...). Records alternate between
- captions: ``jpg`` + ``txt`` ("a red circle at the top left and a blue square at the center."),
- LLaVA conversations: ``json`` with Q/A turns about color, shape, count and position,
- two-image conversations (``0.jpg``, ``1.jpg``): which image has more shapes / total count.
``--text-only`` tells the same scenes in words (``json`` with ``messages``) for the LLM path.
Writes ``DIR/train/shard-*.tar`` and ``DIR/val/shard-*.tar`` and ``DIR/manifest.json``. The same seed
gives the same samples, byte for byte (fixed tar mtime, one RNG).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from taid_vlm.data.synthetic import synth

__all__ = ["synth", "main"]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.synth_shapes", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1000, help="number of samples (train + val)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    ap.add_argument("--text-only", action="store_true", help="scenes described in words, no images (LLM path)")
    a = ap.parse_args(argv)
    rep = synth(a.out, a.n, a.seed, a.size, a.val_fraction, a.maxcount, text_only=a.text_only)
    print(f"train: {rep['train']['written']} samples in {len(rep['train']['shards'])} shards; "
          f"val: {rep['val']['written']} samples in {len(rep['val']['shards'])} shards -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
