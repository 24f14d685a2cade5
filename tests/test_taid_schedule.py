"""The adaptive TAID schedule: hand-computed steps, invariants, state round trip."""

import math
import random

import pytest

from taid_vlm.losses import build_loss


def test_three_steps_by_hand():
    loss = build_loss("taid", t_start=0.4, t_end=1.0, alpha=0.1, beta=0.5)
    assert loss.t == 0.4
    loss.update(2.0, step=1, total_steps=100)  # first update only records J
    assert loss.t == 0.4 and loss.state_dict()["_extra_state"] == {"t": 0.4, "momentum": 0.0, "prev_loss": 2.0}
    # delta = (2 - 1) / 2 = 0.5; m = 0.5 * 0 + 0.5 * 0.5 = 0.25; sigmoid(0.25) = 0.5621765009
    # t = 0.4 + 0.1 * 0.5621765009 * 0.6 = 0.4337305901  (> linear floor 0.412)
    loss.update(1.0, step=2, total_steps=100)
    assert loss.t == pytest.approx(0.4337305901, abs=1e-10)
    assert loss.state_dict()["_extra_state"]["momentum"] == pytest.approx(0.25, abs=1e-12)
    # delta = (1 - 0.5) / 1 = 0.5; m = 0.5 * 0.25 + 0.5 * 0.5 = 0.375; sigmoid(0.375) = 0.5926665999
    # t = 0.4337305901 + 0.1 * 0.5926665999 * 0.5662694099 = 0.4672914866
    loss.update(0.5, step=3, total_steps=100)
    assert loss.t == pytest.approx(0.4672914866, abs=1e-10)
    assert loss.state_dict()["_extra_state"]["prev_loss"] == 0.5


def test_linear_floor_takes_over_when_loss_rises():
    loss = build_loss("taid", t_start=0.2, alpha=1e-4)
    loss.update(1.0, 1, 10)
    loss.update(5.0, 2, 10)
    assert loss.t == pytest.approx(0.2 + 0.8 * 2 / 10)


@pytest.mark.parametrize("seed", range(3))
def test_monotone_floor_and_cap(seed):
    rng = random.Random(seed)
    loss = build_loss("taid", t_start=0.4, t_end=0.9, alpha=0.05, beta=0.9)
    total = 300
    previous = loss.t
    value = 5.0
    for step in range(1, total + 1):
        value = max(1e-3, value * (1 + rng.uniform(-0.1, 0.08)))
        loss.update(value, step, total)
        floor = 0.4 + 0.5 * step / total
        assert loss.t >= previous
        assert loss.t <= 0.9
        if step > 1:
            assert loss.t >= floor - 1e-12
        previous = loss.t
    assert loss.t == pytest.approx(0.9)


def test_non_finite_loss_is_ignored_with_warning():
    loss = build_loss("taid")
    loss.update(1.0, 1, 10)
    before = loss.state_dict()
    with pytest.warns(UserWarning, match="non-finite"):
        loss.update(math.nan, 2, 10)
    assert loss.state_dict() == before


def test_linear_schedule_ignores_the_loss():
    loss = build_loss("taid_linear", t_start=0.2, t_end=0.8)
    for step, value in [(1, 3.0), (5, 100.0), (10, 0.1)]:
        loss.update(value, step, 10)
        assert loss.t == pytest.approx(0.2 + 0.6 * step / 10)


def test_state_dict_round_trip_continues_identically():
    a = build_loss("taid", alpha=0.01)
    values = [3.0, 2.5, 2.7, 2.0, 1.8, 1.9, 1.2]
    for step, value in enumerate(values[:4], start=1):
        a.update(value, step, 50)
    b = build_loss("taid", alpha=0.01)
    b.load_state_dict(a.state_dict())
    assert b.t == a.t
    for step, value in enumerate(values[4:], start=5):
        a.update(value, step, 50)
        b.update(value, step, 50)
        assert a.t == b.t
    assert a.state_dict() == b.state_dict()


def test_ctkd_state_round_trip_includes_temperature():
    import torch

    a = build_loss("ctkd")
    with torch.no_grad():
        a.temperature_logit.fill_(-0.3)
    a.update(1.0, 3, 10)
    b = build_loss("ctkd")
    b.load_state_dict(a.state_dict())
    assert b.temperature_logit.item() == pytest.approx(-0.3) and b.grl_lambda == a.grl_lambda


def test_schedule_state_travels_inside_a_parent_module():
    import torch

    parent = torch.nn.Module()
    parent.loss = build_loss("ctkd")
    parent.loss.update(1.0, 5, 10)
    sd = parent.state_dict()
    assert set(sd) == {"loss.temperature_logit", "loss._extra_state"}
    other = torch.nn.Module()
    other.loss = build_loss("ctkd")
    other.load_state_dict(sd)
    assert other.loss.grl_lambda == parent.loss.grl_lambda


def test_bad_state_and_steps_are_errors():
    loss = build_loss("taid")
    with pytest.raises(KeyError, match="momentum"):
        loss.load_state_dict({"_extra_state": {"t": 0.5, "prev_loss": None}})
    with pytest.raises(KeyError, match="unexpected schedule state"):
        build_loss("fkl").load_state_dict({"_extra_state": {"t": 0.5}})
    with pytest.raises(ValueError, match="total_steps must be > 0"):
        loss.update(1.0, 1, 0)
    assert build_loss("fkl").t is None
