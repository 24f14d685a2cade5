"""Synthetic image-text data: colored shapes on a plain background, deterministic for a seed.

Each image holds 1-3 shapes (circle, square, triangle) of distinct colors in distinct cells of a 3x3
grid; positions are named (top left, center, bottom right ...). Records alternate between
- captions: ``jpg`` + ``txt`` ("a red circle at the top left and a blue square at the center."),
- LLaVA conversations: ``json`` with Q/A turns about color, shape, count and position,
- two-image conversations (``0.jpg``, ``1.jpg``): which image has more shapes / total count.
``text_only=True`` tells the same scenes in words (``json`` with ``messages``) for the LLM path.
``synth(out, n, ...)`` writes ``out/train/shard-*.tar``, ``out/val/shard-*.tar`` and ``out/manifest.json``;
the same seed gives the same samples, byte for byte (fixed tar mtime, one RNG). The command line is
``python -m data_tools.synth_shapes``; tiny recipes call it through ``data.synthetic``.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Tuple

from PIL import Image, ImageDraw

from .shard_writer import write_shards

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (235, 210, 30),
          "purple": (140, 50, 170), "orange": (245, 140, 20), "black": (15, 15, 15), "cyan": (30, 200, 210)}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")


def position_name(r: int, c: int) -> str:
    if r == 1 and c == 1:
        return "center"
    if r == 1:
        return COLS[c]
    if c == 1:
        return ROWS[r]
    return f"{ROWS[r]} {COLS[c]}"


def random_scene(rng: random.Random) -> List[Dict[str, Any]]:
    n = rng.randint(1, 3)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    colors = rng.sample(sorted(COLORS), n)
    return [{"shape": rng.choice(SHAPES), "color": col, "cell": cell} for col, cell in zip(colors, cells)]


def draw(scene: List[Dict[str, Any]], size: int, rng: random.Random) -> bytes:
    bg = tuple(rng.randint(215, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    cell = size / 3
    for obj in scene:
        r, c = obj["cell"]
        cx, cy = (c + 0.5) * cell, (r + 0.5) * cell
        h = cell * rng.uniform(0.28, 0.42)
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif obj["shape"] == "square":
            d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            d.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def describe(obj: Dict[str, Any]) -> str:
    return f"a {obj['color']} {obj['shape']} at the {position_name(*obj['cell'])}"


def caption(scene) -> str:
    parts = [describe(o) for o in scene]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def qa_turns(scene, rng: random.Random) -> List[Tuple[str, str]]:
    obj = rng.choice(scene)
    where = position_name(*obj["cell"])
    pool = [
        (f"What color is the {obj['shape']} at the {where}?", obj["color"]),
        (f"What shape is the {obj['color']} object?", obj["shape"]),
        ("How many shapes are there?", NUMBERS[len(scene)]),
        (f"Where is the {obj['color']} {obj['shape']}?", f"At the {where}."),
        (f"How many {obj['shape']}s are there?", NUMBERS[sum(o["shape"] == obj["shape"] for o in scene)]),
    ]
    return rng.sample(pool, rng.randint(1, 3))


def make_record(i: int, rng: random.Random, size: int):
    kind = ("caption", "qa", "qa", "multi")[i % 4]
    key = f"shapes{i:07d}"
    if kind == "caption":
        scene = random_scene(rng)
        return key, [("jpg", draw(scene, size, rng))], {"txt": caption(scene)}
    if kind == "qa":
        scene = random_scene(rng)
        conv = []
        for t, (q, a) in enumerate(qa_turns(scene, rng)):
            conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
        return key, [("jpg", draw(scene, size, rng))], {"json": {"conversations": conv}}
    s1, s2 = random_scene(rng), random_scene(rng)
    imgs = [("jpg", draw(s1, size, rng)), ("jpg", draw(s2, size, rng))]
    if len(s1) == len(s2):
        q, a = "How many shapes are there in the two images together?", NUMBERS[len(s1) + len(s2)]
    else:
        q, a = "Which image has more shapes, the first or the second?", "The first." if len(s1) > len(s2) else "The second."
    conv = [{"from": "human", "value": f"<image>\n<image>\n{q}"}, {"from": "gpt", "value": a}]
    return key, imgs, {"json": {"conversations": conv}}


def make_text_record(i: int, rng: random.Random):
    """The same scenes told in words (the LLM path): the scene description, then Q/A about it."""
    scene = random_scene(rng)
    messages = []
    for t, (q, a) in enumerate(qa_turns(scene, rng)):
        prompt = f"Scene: {caption(scene)}\n{q}" if t == 0 else q
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}]
    return f"shapes{i:07d}", [], {"json": {"messages": messages}}


def synth(out: Path, n: int, seed: int = 0, size: int = 64, val_fraction: float = 0.1,
          maxcount: int = 1000, text_only: bool = False) -> Dict[str, Any]:
    out, rng = Path(out), random.Random(seed)
    if text_only:
        records = [make_text_record(i, rng) for i in range(n)]
    else:
        records = [make_record(i, rng, size) for i in range(n)]
    split = random.Random(f"split:{seed}")
    is_val = [split.random() < val_fraction for _ in range(n)]
    report = {"seed": seed, "n": n, "size": size, "text_only": text_only}
    for name, want in (("train", False), ("val", True)):
        part = [r for r, v in zip(records, is_val) if v == want]
        report[name] = write_shards(iter(part), out / name, "shard", maxcount=maxcount)
    (out / "manifest.json").write_text(json.dumps(report, indent=1))
    return report
