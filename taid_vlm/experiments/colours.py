"""One colour per method, the same in every plot of the package (demo, compare, capacity gap).

A method keeps its colour whichever plot and whichever other methods it is drawn with, so a reader can
follow TAID from one picture to the next. Keys are loss names (`taid_vlm.losses.LOSS_NAMES`), the
paper's protocols (methods.py) and the teacher; a skew variant is a lighter shade of its parent's colour,
and LOSS+MODE (trained on student-generated text) a darker shade of its loss's colour, one per mode.

    method_colour("taid") == method_colour("TAID student")   # the demo labels its runs "<METHOD> student"
    method_colour("taid+on_policy")                          # TAID's orange, darkened
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
    "gkd": "#c49c94",           # gjsd + mixed sampling (methods.PROTOCOLS)
    "distillm": "#637939",      # sfkl + adaptive sampling
    "teacher": "tab:gray",      # also the colour of the teacher's reference lines
}

# LOSS+MODE: the loss's colour mixed with this share of black (methods.SAMPLED_MODES)
MODE_DARKENING = {"mixed": 0.3, "adaptive": 0.45, "on_policy": 0.6}

# What the demo and the docs call a method, when it is not its loss name.
ALIASES = {"sft": "ce"}

# A loss added later without an entry above still gets a colour of its own, stable across plots and runs.
_SPARE = ("#393b79", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "black")


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
    loss, _, mode = key.partition("+")
    if loss in METHOD_COLOURS and mode in MODE_DARKENING:
        from matplotlib.colors import to_hex, to_rgb  # here: importing this module must not load matplotlib

        return to_hex([c * (1.0 - MODE_DARKENING[mode]) for c in to_rgb(METHOD_COLOURS[loss])])
    return _SPARE[zlib.crc32(key.encode()) % len(_SPARE)]
