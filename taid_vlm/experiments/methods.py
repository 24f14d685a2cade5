"""What `taid-vlm compare --losses` accepts: a loss name, or a method = a loss plus a sampling mode.

- `LOSS` (taid, fkl, ...): the loss, with the config's parameters if it is the config's loss, else its
  defaults; the config's sampling settings as they are.
- `LOSS+MODE` (e.g. `taid+on_policy`, `fkl+mixed`): the same loss, trained with `sampling.mode: MODE`
  (docs/sampling.md).
- The paper's baselines as the official TAID code ran them (SakanaAI/TAID scripts/*/gkd.sh, distillm.sh):
  `gkd` = gjsd (beta 0.1) + mixed, `distillm` = sfkl (skew 0.1) + adaptive.
"""

from __future__ import annotations

SAMPLED_MODES = ("mixed", "adaptive", "on_policy")
# name -> (loss, its parameters, sampling mode)
PROTOCOLS = {
    "gkd": ("gjsd", {"beta": 0.1}, "mixed"),
    "distillm": ("sfkl", {"skew": 0.1}, "adaptive"),
}


class MethodError(ValueError):
    """A method name that is neither a loss, LOSS+MODE, nor a protocol; the message lists the choices."""


def split_method(name: str) -> tuple[str, dict | None, str | None]:
    """(loss, loss parameters or None for "the config's or the defaults", sampling mode or None)."""
    from taid_vlm.losses import LOSS_NAMES

    if name in PROTOCOLS:
        return PROTOCOLS[name]
    loss, plus, mode = name.partition("+")
    if loss not in LOSS_NAMES or (plus and mode not in SAMPLED_MODES):
        raise MethodError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}, a loss+MODE with MODE one "
                          f"of {', '.join(SAMPLED_MODES)} (e.g. taid+on_policy), or {', '.join(PROTOCOLS)}")
    return loss, None, (mode or None)


def method_overrides(name: str, config_loss: str) -> list[str]:
    """The `key=value` overrides that turn a config into a run of this method."""
    loss, params, mode = split_method(name)
    if params is None:
        params = None if loss == config_loss else {}
    out = [f"loss.name={loss}"]
    if params is not None:
        out.append("loss.params={" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}")
    if mode is not None:
        out.append(f"sampling.mode={mode}")
    return out
