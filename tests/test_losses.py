"""Every loss against its float64 NumPy reference, gradients, masking, parameter validation."""

import math
import zlib

import numpy as np
import pytest
import torch

from taid_vlm.losses import LOSS_NAMES, build_loss, loss_parameters
from tests.loss_reference import REFERENCES, ctkd_temperature, masked_mean

# Losses whose value depends on the student only through differentiable paths (no stop-gradient).
NO_STOPGRAD = [n for n in LOSS_NAMES if n not in ("taid", "taid_linear", "akl")]


def make_batch(n=9, v=13, seed=0, banned=0.15, teacher_only_banned=0.0, scale=2.5):
    """Random logits with shared banned (-inf) vocabulary entries, labels never on a banned entry."""
    rng = np.random.default_rng(seed)
    zs = rng.normal(size=(n, v)) * scale
    zt = rng.normal(size=(n, v)) * scale
    ban = rng.random((n, v)) < banned
    y = rng.integers(0, v, size=n)
    ban[np.arange(n), y] = False
    ban[:, 0] = False  # keep at least two allowed entries per row
    ban[np.arange(n), (y + 1) % v] = False
    zs[ban] = -np.inf
    zt[ban] = -np.inf
    if teacher_only_banned:
        only = (rng.random((n, v)) < teacher_only_banned) & ~ban
        only[np.arange(n), y] = False
        only[:, 0] = False
        only[np.arange(n), (y + 1) % v] = False
        zt[only] = -np.inf
    mask = rng.random(n) < 0.7
    mask[0] = True
    return zs, zt, y, mask


def as_torch(zs, zt, y, mask, dtype):
    return (
        torch.tensor(zs, dtype=dtype, requires_grad=True),
        torch.tensor(zt, dtype=dtype),
        torch.tensor(y),
        torch.tensor(mask),
    )


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_value_matches_float64_reference_with_banned_entries(name, dtype, rtol):
    zs, zt, y, mask = make_batch(seed=zlib.crc32(name.encode()) % 1000)  # stable across PYTHONHASHSEED
    s, t, labels, m = as_torch(zs, zt, y, mask, dtype)
    value = build_loss(name)(s, t, m, labels)
    # The reference sees exactly the values the loss saw (float32-rounded in the float32 case).
    expected = masked_mean(name, s.detach().double().numpy(), t.double().numpy(), y, mask)
    assert math.isfinite(expected) and expected > 0
    assert value.dtype == torch.promote_types(dtype, torch.float32)
    assert abs(value.item() - expected) <= rtol * abs(expected)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_teacher_only_banned_entries_stay_finite_and_exact(name):
    """rkl and akl leave out the reverse-KL terms on teacher-banned tokens (the reference code's masking)."""
    zs, zt, y, mask = make_batch(seed=3, teacher_only_banned=0.3)
    s, t, labels, m = as_torch(zs, zt, y, mask, torch.float64)
    value = build_loss(name)(s, t, m, labels)
    value.backward()
    expected = masked_mean(name, zs, zt, y, mask)
    assert math.isfinite(value.item())
    assert abs(value.item() - expected) <= 1e-9 * abs(expected)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_finite_and_zero_on_banned_entries(name):
    zs, zt, y, mask = make_batch(seed=5, banned=0.3)
    s, t, labels, m = as_torch(zs, zt, y, mask, torch.float32)
    build_loss(name)(s, t, m, labels).backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[torch.isinf(s.detach())] == 0).all()


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n != "ce"])
def test_zero_divergence_when_student_equals_teacher(name):
    zs, _, y, mask = make_batch(seed=7)
    s = torch.tensor(zs, requires_grad=True)
    value = build_loss(name)(s, s.detach().clone(), torch.tensor(mask), torch.tensor(y))
    assert abs(value.item()) < 1e-12
    value.backward()
    assert s.grad.abs().max().item() < 1e-12


def numeric_gradient(name, zs, zt, y, mask, eps=1e-6):
    """Central differences of the float64 reference; detached parts stay frozen at zs."""
    grad = np.zeros_like(zs)
    for i, j in zip(*np.nonzero(np.isfinite(zs))):
        plus, minus = zs.copy(), zs.copy()
        plus[i, j] += eps
        minus[i, j] -= eps
        grad[i, j] = (
            masked_mean(name, plus, zt, y, mask, frozen=zs) - masked_mean(name, minus, zt, y, mask, frozen=zs)
        ) / (2 * eps)
    return grad


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradient_matches_finite_differences_of_reference(name):
    """Covers the stop-gradient losses too: TAID's target and AKL's weights use the detached student."""
    zs, zt, y, mask = make_batch(n=4, v=6, seed=11, banned=0.2)
    s, t, labels, m = as_torch(zs, zt, y, mask, torch.float64)
    build_loss(name)(s, t, m, labels).backward()
    np.testing.assert_allclose(s.grad.numpy(), numeric_gradient(name, zs, zt, y, mask), rtol=1e-5, atol=1e-8)


def test_taid_gradient_is_student_minus_target():
    zs, zt, _, mask = make_batch(seed=13, banned=0.0)
    s, t, _, m = as_torch(zs, zt, np.zeros(len(zs), dtype=int), mask, torch.float64)
    loss = build_loss("taid", t_start=0.3)
    loss(s, t, m).backward()
    target = torch.softmax(0.7 * s.detach() + 0.3 * t, -1)
    expected = (torch.softmax(s.detach(), -1) - target) * m[:, None] / m.sum()
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", NO_STOPGRAD)
def test_gradcheck_small_float64(name):
    zs, zt, y, mask = make_batch(n=3, v=5, seed=17, banned=0.0)
    s, t, labels, m = as_torch(zs, zt, y, mask, torch.float64)
    loss = build_loss(name)
    assert torch.autograd.gradcheck(lambda x: loss(x, t, m, labels), (s,), eps=1e-6, atol=1e-7)


def test_ctkd_temperature_gradient_is_reversed_and_scaled():
    zs, zt, y, mask = make_batch(n=5, v=7, seed=19, banned=0.0)
    s, t, labels, m = as_torch(zs, zt, y, mask, torch.float64)
    loss = build_loss("ctkd").double()
    loss.update(0.0, step=1, total_steps=4)  # lambda = 0.5 * (1 + cos(1.25 pi))
    lam = 0.5 * (1 + math.cos(math.pi * 1.25))
    assert loss.grl_lambda == pytest.approx(lam)
    loss(s, t, m, labels).backward()

    def value_at(logit):
        return masked_mean("ctkd", zs, zt, y, mask, temperature=ctkd_temperature(logit=logit))

    d_value = (value_at(1.0 + 1e-6) - value_at(1.0 - 1e-6)) / 2e-6
    assert loss.temperature_logit.grad.item() == pytest.approx(-lam * d_value, rel=1e-6)


def test_ctkd_curriculum_rises_from_min_to_max():
    loss = build_loss("ctkd", lambda_min=0.0, lambda_max=2.0, curriculum_fraction=0.5)
    seen = []
    for step in range(0, 11):
        loss.update(1.0, step, 10)
        seen.append(loss.grl_lambda)
    assert seen[0] == 0.0 and seen[5] == pytest.approx(2.0) and seen[10] == pytest.approx(2.0)
    assert all(a <= b for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_masked_tokens_contribute_nothing(name):
    zs, zt, y, mask = make_batch(seed=23)
    s, t, labels, m = as_torch(zs, zt, y, mask, torch.float64)
    loss = build_loss(name)
    value = loss(s, t, m, labels)
    value.backward()
    assert (s.grad[~m] == 0).all()
    # garbage (NaN, huge) in masked-out rows changes nothing
    zs2, zt2 = zs.copy(), zt.copy()
    zs2[~mask] = np.nan
    zt2[~mask] = 1e30
    s2, t2, _, _ = as_torch(zs2, zt2, y, mask, torch.float64)
    y2 = labels.clone()
    y2[~m] = -100
    assert loss(s2, t2, m, y2).item() == value.item()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_empty_mask_gives_zero_without_nan(name):
    zs, zt, y, _ = make_batch(seed=29)
    s, t, labels, _ = as_torch(zs, zt, y, np.zeros(len(zs), dtype=bool), torch.float32)
    m = torch.zeros(len(zs), dtype=torch.bool)
    value = build_loss(name)(s, t, m, labels)
    value.backward()
    assert value.item() == 0.0
    assert (s.grad == 0).all()


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n != "ce"])
def test_ce_weight_adds_label_cross_entropy(name):
    zs, zt, y, mask = make_batch(seed=31)
    s, t, labels, m = as_torch(zs, zt, y, mask, torch.float64)
    mixed = build_loss(name, ce_weight=0.25)(s, t, m, labels).item()
    expected = masked_mean(name, zs, zt, y, mask) + 0.25 * masked_mean("ce", zs, zt, y, mask)
    assert mixed == pytest.approx(expected, rel=1e-10)


def test_parameters_reach_the_divergence():
    zs, zt, y, mask = make_batch(seed=37)
    s, t, labels, m = as_torch(zs, zt, y, mask, torch.float64)
    cases = [
        ("gjsd", {"beta": 0.7}),
        ("sfkl", {"skew": 0.4}),
        ("srkl", {"skew": 0.4}),
        ("akl", {"mu": 0.8}),
        ("dkd", {"alpha": 0.5, "beta": 2.0, "temperature": 2.0}),
        ("taid", {"t": 0.8}),
    ]
    for name, kwargs in cases:
        build_kwargs = {"t_start": kwargs["t"]} if name == "taid" else kwargs
        got = build_loss(name, **build_kwargs)(s, t, m, labels).item()
        assert got == pytest.approx(masked_mean(name, zs, zt, y, mask, **kwargs), rel=1e-10), name


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown loss 'kld'.*taid.*fkl"):
        build_loss("kld")


def test_unknown_parameter_is_named():
    with pytest.raises(TypeError, match=r"loss 'taid' got unknown parameter\(s\) \['temperature'\]"):
        build_loss("taid", temperature=2.0)


@pytest.mark.parametrize(
    "name,kwargs,culprit",
    [
        ("taid", {"t_start": 1.5}, "t_start"),
        ("taid", {"t_start": 0.6, "t_end": 0.5}, "t_end"),
        ("taid", {"beta": 1.0}, "beta"),
        ("taid", {"alpha": -1e-3}, "alpha"),
        ("gjsd", {"beta": 0.0}, "beta"),
        ("sfkl", {"skew": 1.0}, "skew"),
        ("srkl", {"skew": -0.1}, "skew"),
        ("akl", {"mu": 1.0}, "mu"),
        ("dkd", {"temperature": 0.0}, "temperature"),
        ("ctkd", {"t_min": 5.0, "t_max": 2.0}, "t_max"),
        ("fkl", {"ce_weight": -1.0}, "ce_weight"),
        ("gjsd", {"beta": "high"}, "beta"),
    ],
)
def test_bad_parameter_values_are_named(name, kwargs, culprit):
    with pytest.raises(ValueError, match=rf"{name}: {culprit} must"):
        build_loss(name, **kwargs)


def test_shape_and_vocabulary_mismatches():
    loss = build_loss("fkl")
    s, t, m = torch.randn(4, 10), torch.randn(4, 12), torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="vocabulary mismatch: student has 10 .* teacher has 12"):
        loss(s, t, m)
    with pytest.raises(ValueError, match=r"does not match student_logits shape"):
        loss(s, torch.randn(5, 10), m)
    with pytest.raises(ValueError, match=r"student_logits must be \[N, V\]"):
        loss(torch.randn(2, 2, 10), torch.randn(2, 2, 10), m)
    with pytest.raises(ValueError, match=r"mask must have shape \(4,\)"):
        loss(s, torch.randn(4, 10), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels are required"):
        build_loss("dkd")(s, torch.randn(4, 10), m)
    with pytest.raises(ValueError, match="labels are required .*ce_weight"):
        build_loss("fkl", ce_weight=0.5)(s, torch.randn(4, 10), m)
    with pytest.raises(ValueError, match=r"labels of masked-in tokens must be in \[0, 10\)"):
        build_loss("ce")(s, None, m, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="needs teacher_logits"):
        loss(s, None, m)


def test_loss_parameters_lists_defaults():
    assert loss_parameters("taid") == {"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99, "ce_weight": 0.0}
    assert loss_parameters("gjsd")["beta"] == 0.1 and loss_parameters("sfkl")["skew"] == 0.1
    assert loss_parameters("akl")["mu"] == 0.5
    assert set(LOSS_NAMES) == set(REFERENCES)
