"""Schedules (closed forms, interpolation, Diffusers tables), the validator, VE/VP/flow conversions."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.core import schedules as S


def test_karras_closed_form() -> None:
    s = S.karras(10, 0.002, 80.0)
    assert s.shape == (11,) and s.dtype == torch.float64 and float(s[-1]) == 0.0
    assert float(s[0]) == pytest.approx(80.0, rel=1e-14) and float(s[-2]) == pytest.approx(0.002, rel=1e-12)
    i = torch.arange(10, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(s[:-1], expected, rtol=1e-14, atol=0)
    S.validate_sigmas(s, allow_final_positive=False)
    one = S.karras(1, 0.1, 5.0)
    assert one.tolist() == pytest.approx([5.0, 0.0], rel=1e-14)


def test_loglinear_and_vp_time_uniform_closed_forms() -> None:
    s = S.loglinear(8, 0.01, 10.0)
    gaps = s[:-1].log().diff()
    expected_gap = torch.full((7,), math.log(0.001) / 7, dtype=torch.float64)
    torch.testing.assert_close(gaps, expected_gap, rtol=1e-12, atol=0)
    v = S.vp_time_uniform(5)
    t = torch.linspace(1, 1e-3, 5, dtype=torch.float64)
    expected = torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
    torch.testing.assert_close(v[:-1], expected, rtol=1e-12, atol=0)
    assert float(v[0]) == pytest.approx(152.0, rel=0.01)  # EDM's VP sigma_max
    assert float(v[-1]) == 0.0


def test_loglinear_interp_and_resample() -> None:
    knots = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002], dtype=torch.float64)
    torch.testing.assert_close(S.loglinear_interp(knots, 5), knots)
    fine = S.loglinear_interp(knots, 9)  # midpoints are geometric means
    torch.testing.assert_close(fine[::2], knots, rtol=1e-14, atol=0)
    assert float(fine[1]) == pytest.approx(math.sqrt(800.0), rel=1e-14)
    r = S.resample(S.karras(10, 0.002, 80.0), 4)
    assert r.shape == (5,) and float(r[-1]) == 0 and float(r[0]) == pytest.approx(80.0)
    assert float(r[-2]) == pytest.approx(0.002)
    S.validate_sigmas(r)
    r2 = S.resample(knots, 8)  # no final 0: n + 1 positive knots
    assert r2.shape == (9,) and float(r2[-1]) == pytest.approx(0.002)
    with pytest.raises(ValueError, match="num must be >= 2"):
        S.loglinear_interp(knots, 1)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_diffusers_table_matches_euler_scheduler(beta_schedule: str) -> None:
    from _tiny_models import vp_scheduler_config
    from diffusers import EulerDiscreteScheduler

    cfg = vp_scheduler_config(beta_schedule)
    table = S.diffusers_table(cfg, 12)
    sched = EulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(12)
    assert table.shape == (13,) and float(table[-1]) == 0
    torch.testing.assert_close(table, sched.sigmas.double())
    abar = sched.alphas_cumprod.double()
    assert float(table[0]) == pytest.approx(float(((1 - abar[-1]) / abar[-1]).sqrt()), rel=1e-6)


def test_diffusers_table_flow_and_cap() -> None:
    from _tiny_models import flow_scheduler_config

    cfg = flow_scheduler_config(shift=3.0)
    assert S.is_flow_config(cfg) and not S.is_flow_config({"beta_schedule": "linear", "shift": 1.0})
    table = S.diffusers_table(cfg, 6)
    assert float(table[0]) == S.FLOW_SIGMA_MAX  # t = 1 is capped
    S.validate_sigmas(table, allow_final_positive=False)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(6)
    t = sched.sigmas.double()
    torch.testing.assert_close(S.sigma_to_flow_t(table[1:]), t[1:], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Conversions
# ------------------------------------------------------------------------------------------------


def test_conversions_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    # sigma in [0.05, 403]; below that 1 - alpha_bar cancels and the round trip loses digits
    sigma = torch.exp(torch.empty(64, dtype=torch.float64).uniform_(-3, 6, generator=g))
    x = torch.randn(64, 3, generator=g, dtype=torch.float64) * (1 + sigma[:, None])
    # VE <-> VP
    abar = S.sigma_to_alpha_bar(sigma)
    torch.testing.assert_close(S.alpha_bar_to_sigma(abar), sigma, rtol=1e-12, atol=0)
    x_vp = S.ve_to_vp(x, sigma)
    torch.testing.assert_close(x_vp, x * abar.sqrt()[:, None], rtol=1e-14, atol=0)
    torch.testing.assert_close(S.vp_to_ve(x_vp, sigma), x, rtol=1e-12, atol=0)
    # VE <-> Diffusers flow (t = sigma / (1 + sigma), 1 = noise)
    t = S.sigma_to_flow_t(sigma)
    torch.testing.assert_close(S.flow_t_to_sigma(t), sigma, rtol=1e-9, atol=0)  # t near 1 loses digits
    x_fm = S.ve_to_flow(x, sigma)
    torch.testing.assert_close(S.flow_to_ve(x_fm, t), x, rtol=1e-12, atol=0)
    # VP state and flow state of the same x0, eps agree with their definitions
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, generator=g, dtype=torch.float64)
    xv = x0 + sigma[:, None] * eps
    a, b = abar.sqrt()[:, None], (1 - abar).sqrt()[:, None]
    torch.testing.assert_close(S.ve_to_vp(xv, sigma), a * x0 + b * eps, rtol=1e-12, atol=1e-12)
    x_flow = (1 - t[:, None]) * x0 + t[:, None] * eps
    torch.testing.assert_close(S.ve_to_flow(xv, sigma), x_flow, rtol=1e-12, atol=1e-12)
    # rectified flow (t = 0 noise, t = 1 data): x_t = (1 - t) eps + t x0 and x = x_t / t
    rt = S.sigma_to_rf_t(sigma)
    torch.testing.assert_close(S.rf_t_to_sigma(rt), sigma, rtol=1e-9, atol=0)
    torch.testing.assert_close(rt, 1 - t, rtol=1e-12, atol=1e-15)  # opposite directions
    x_rf = (1 - rt[:, None]) * eps + rt[:, None] * x0
    torch.testing.assert_close(x_rf / rt[:, None], xv, rtol=1e-12, atol=1e-12)


def test_flow_cap() -> None:
    assert float(S.flow_t_to_sigma(torch.tensor(1.0))) == pytest.approx(S.FLOW_SIGMA_MAX, rel=1e-9)
    assert float(S.flow_t_to_sigma(torch.tensor(0.0))) == 0.0


# ------------------------------------------------------------------------------------------------
# Validator
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([1.0, 2.0, 0.0], r"sigmas must be .*strictly decreasing.*entry 1"),
        ([3.0, 3.0, 0.0], r"not strictly decreasing"),
        ([float("nan"), 1.0, 0.0], r"finite sigmas.*entry 0 is nan"),
        ([float("inf"), 1.0, 0.0], r"entry 0 is inf"),
        ([5.0], r">= 2 finite sigmas.*got 1 entries"),
        ([], r"got 0 entries"),
        ([[2.0, 1.0]], r"got shape \(1, 2\)"),
        ([2.0, 0.0, -1.0], r"all > 0 except a final 0"),
        ("abc", r"sigmas must be a 1-D schedule"),
    ],
)
def test_validator_rejects_with_accepted_range(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        S.validate_sigmas(bad)


def test_validator_accepts_and_preserves() -> None:
    s = torch.tensor([3.0, 1.0, 0.5], requires_grad=True)
    out = S.validate_sigmas(s)
    assert out is s  # float tensors pass through, autograd graph intact
    with pytest.raises(ValueError, match="end in 0"):
        S.validate_sigmas(s, allow_final_positive=False)
    assert S.validate_sigmas([2, 1, 0]).dtype == torch.float64
    with pytest.raises(ValueError, match="myschedule must be"):
        S.validate_sigmas([1.0, 2.0], name="myschedule")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: S.karras(0, 0.002, 80.0), r"n \(number of steps\) must be an integer >= 1"),
        (lambda: S.karras(4, 1.0, 0.5), r"0 < sigma_min < sigma_max"),
        (lambda: S.karras(4, 0.0, 0.5), r"0 < sigma_min < sigma_max"),
        (lambda: S.karras(4, 0.1, float("inf")), r"sigma_max < inf"),
        (lambda: S.karras(4, 0.1, 1.0, rho=0.0), r"rho must be > 0"),
        (lambda: S.loglinear(2.5, 0.1, 1.0), r"n \(number of steps\)"),
        (lambda: S.vp_time_uniform(4, eps_s=1.5), r"eps_s must be in \(0, 1\)"),
        (lambda: S.resample(S.karras(4, 0.1, 1.0), 0), r"n must be an integer >= 1"),
    ],
)
def test_schedule_constructors_reject_bad_arguments(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_flow_uniform_is_uniform_in_flow_time():
    """n sigmas whose flow times t = sigma / (1 + sigma) are equally spaced from t(sigma_max) to t(sigma_min),
    then 0; the ends are exact."""
    s = S.flow_uniform(6, 0.001, 1000.0)
    assert s.shape == (7,) and float(s[-1]) == 0.0
    assert float(s[0]) == 1000.0 and float(s[-2]) == 0.001
    t = s[:-1] / (1 + s[:-1])
    gaps = t.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, float(gaps.mean())), rtol=1e-12, atol=1e-14)
    # the spacing is (t_hi - t_lo) / (n - 1)
    assert float(gaps.mean()) == pytest.approx(-(1000 / 1001 - 0.001 / 1.001) / 5, rel=1e-12)
    with pytest.raises(ValueError):
        S.flow_uniform(0, 0.001, 1000.0)
