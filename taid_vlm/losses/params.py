"""Validation of loss hyper-parameters: a bad value is an error naming the loss and the parameter."""

from __future__ import annotations


def check_range(loss: str, name: str, value, low: float, high: float, *, low_open=False, high_open=False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{loss}: {name} must be a number, got {value!r}") from None
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{loss}: {name} must be in {interval}, got {value}")
    return value
