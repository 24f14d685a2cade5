"""One colour per method, the same in every plot of the package (demo, compare, capacity gap).

A method keeps its colour whichever plot and whichever other methods it is drawn with, so a reader can
follow TAID from one picture to the next. Keys are loss names (`taid_vlm.losses.LOSS_NAMES`) plus the
teacher; a skew variant is a lighter shade of its parent's colour.

    method_colour("taid") == method_colour("TAID student")   # the demo labels its runs "<METHOD> student"
"""

from __future__ import annotations

import zlib

METHOD_COLOURS: dict[str, str] = {
    "taid": "tab:orange",
    "taid_linear": "#ffbb78",   # light orange: TAID without the adaptive term
    "ce": "tab:blue",           # SFT: cross-entropy on the labels only
    "fkl": "tab:green",
    "sfkl": "#98df8a",          # light green: skew forward KL
    "rkl": "tab:red",
    "srkl": "#ff9896",          # light red: skew reverse KL
    "tvd": "tab:purple",
    "gjsd": "tab:brown",
    "akl": "tab:pink",
    "ctkd": "tab:cyan",
    "dkd": "tab:olive",
    "teacher": "tab:gray",      # also the colour of the teacher's reference lines
}

# What the demo and the docs call a method, when it is not its loss name.
ALIASES = {"sft": "ce"}

# A loss added later without an entry above still gets a colour of its own, stable across plots and runs.
_SPARE = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "black")


def method_key(label: str) -> str:
    """The method a plot label names: the label itself, or its first word ("TAID student" -> "taid")."""
    key = label.strip().lower()
    if key not in METHOD_COLOURS and key not in ALIASES:
        key = key.split(" ", 1)[0] if key else key
    return ALIASES.get(key, key)


def method_colour(label: str) -> str:
    key = method_key(label)
    if key in METHOD_COLOURS:
        return METHOD_COLOURS[key]
    return _SPARE[zlib.crc32(key.encode()) % len(_SPARE)]
