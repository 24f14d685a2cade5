"""Losses by name: `build_loss("taid", t_start=0.4)`. Adding one is a class and a line here."""

from __future__ import annotations

import inspect

from .akl import AdaptiveKL
from .base import DistillationLoss
from .ctkd import CurriculumTemperatureKD
from .dkd import DecoupledKD
from .kl_family import (
    CrossEntropy,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
)
from .taid import TAIDLinearLoss, TAIDLoss

_LOSSES: dict[str, type[DistillationLoss]] = {
    "taid": TAIDLoss,
    "taid_linear": TAIDLinearLoss,
    "fkl": ForwardKL,
    "rkl": ReverseKL,
    "tvd": TotalVariation,
    "gjsd": GeneralizedJSD,
    "sfkl": SkewForwardKL,
    "srkl": SkewReverseKL,
    "akl": AdaptiveKL,
    "ctkd": CurriculumTemperatureKD,
    "dkd": DecoupledKD,
    "ce": CrossEntropy,
}

LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def loss_parameters(name: str) -> dict[str, object]:
    """The keyword arguments a loss accepts, with their defaults."""
    cls = _loss_class(name)
    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items() if k != "self" and k != "adaptive"}


def loss_needs_teacher(name: str) -> bool:
    """Whether loss ``name`` compares against a teacher (``ce`` does not): decided by the class, not the name."""
    return _loss_class(name).needs_teacher


def build_loss(name: str, **kwargs) -> DistillationLoss:
    cls = _loss_class(name)
    allowed = loss_parameters(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"loss '{name}' got unknown parameter(s) {unknown}; it accepts {sorted(allowed)}")
    return cls(**kwargs)


def _loss_class(name: str) -> type[DistillationLoss]:
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; choose from {', '.join(LOSS_NAMES)}") from None
