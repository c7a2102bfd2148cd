"""Restart sampling over a denoiser: NFE, plan, jump marginal, contraction, A1111 rule, baselines."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.core import solvers
from fastgen.core.analytic import GaussianMixtureDenoiser
from fastgen.core.schedules import karras
from fastgen.samplers import restart_sample
from fastgen.samplers.restart import (
    PRESETS,
    RestartPlan,
    auto_plan,
    auto_segments,
    build_plan,
    get_preset,
    jump,
    restart_nfe,
)
from fastgen.samplers.stochastic import edm_churn_plan, edm_sde, euler_ancestral


class Counting:
    """Wrap a denoiser and count its calls (and record the sigmas it was called at)."""

    def __init__(self, den):
        self.den, self.calls, self.sigmas = den, 0, []

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return self.den(x, sigma, **cond)


def _mixture() -> GaussianMixtureDenoiser:
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.2]], dtype=torch.float64)
    return GaussianMixtureDenoiser(torch.tensor([0.3, 0.3, 0.4]), means, stds=torch.tensor([0.2, 0.3, 0.25]))


def _gauss(c: float) -> GaussianMixtureDenoiser:
    """Exact denoiser of N(0, c^2): D(x, t) = c^2 x / (c^2 + t^2)."""
    zero = torch.zeros(1, 1, dtype=torch.float64)
    return GaussianMixtureDenoiser(torch.ones(1), zero, stds=torch.tensor([c]))


CIFAR_NFE = {"cifar10-vp-43": 43, "cifar10-vp-55": 55, "cifar10-vp-75": 75, "cifar10-vp-115": 115,
             "cifar10-vp-519": 519, "cifar10-edm-43": 43}
IMAGENET_NFE = {623, 535, 385, 203, 165, 99, 67, 39}


def test_nfe_formula_reproduces_paper_tables():
    for name, nfe in CIFAR_NFE.items():
        assert get_preset(name).nfe == nfe
        assert get_preset(name).plan().nfe == nfe
    imagenet = {name: p for name, p in PRESETS.items() if name.startswith("imagenet64")}
    assert {p.nfe for p in imagenet.values()} == IMAGENET_NFE
    for name, p in imagenet.items():
        assert p.plan().nfe == p.nfe == int(name.split("-")[-1])  # churn adds jumps, not calls
    assert restart_nfe(18, [(3, 2, 0.06, 0.3)]) == 43


@pytest.mark.parametrize("name", ["cifar10-vp-43", "imagenet64-39", "imagenet64-99"])
def test_counted_calls_equal_nfe(name):
    den = Counting(_mixture())
    plan = get_preset(name).plan()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    out = restart_sample(den, x, plan=plan, generator=torch.Generator().manual_seed(1))
    assert den.calls == plan.nfe == get_preset(name).nfe
    assert torch.isfinite(out).all()


def test_plan_snaps_t_min_and_keeps_t_max():
    main = karras(18, 0.002, 80.0)
    plan = build_plan(main, [(3, 2, 0.06, 0.30)])
    snapped = float(main[int(torch.argmin((main[:-1] - 0.06).abs()))])
    s, j = plan.sigmas.tolist(), plan.jumps.tolist()
    starts = [s[i] for i in range(len(j)) if j[i]]
    tops = [s[i + 1] for i in range(len(j)) if j[i]]
    assert starts == [snapped, snapped] and snapped != 0.06
    assert tops == [0.30, 0.30]
    assert plan.num_steps == 17 + 2 * 2 + 1
    # every non-jump transition decreases, every jump increases
    assert all((s[i + 1] > s[i]) == j[i] for i in range(len(j)))


def test_empty_segments_is_heun_bit_for_bit():
    den = _mixture()
    sig = karras(12, 0.002, 80.0)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80
    a = restart_sample(den, x, sig, [])
    b = solvers.heun(den, x, sig)
    assert torch.equal(a, b)
    # zero repeats behaves the same
    assert torch.equal(restart_sample(den, x, sig, [(4, 0, 0.1, 1.0)]), b)


def test_jump_marginal_variance():
    c, t_max = 0.7, 1.5
    main = karras(10, 0.01, 10.0)
    plan = build_plan(main, [(3, 1, 0.3, t_max)])
    i = int(torch.nonzero(plan.jumps)[0])
    t_min = float(plan.sigmas[i])
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x = c * torch.randn(n, generator=g, dtype=torch.float64)
    x = x + t_min * torch.randn(n, generator=g, dtype=torch.float64)
    y = jump(x, t_min, float(plan.sigmas[i + 1]), 1.0, g)
    assert y.var().item() == pytest.approx(c**2 + t_max**2, rel=0.01)


def test_vp_jump_is_sqrt_alpha_bar_times_ve_jump():
    t_min, t_max, s_noise = 0.3, 2.0, 1.003
    x_ve = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = torch.randn(1000, generator=torch.Generator().manual_seed(1)).double()  # jump noise is drawn in fp32
    ab_min, ab_max = 1 / (1 + t_min**2), 1 / (1 + t_max**2)
    x_vp = math.sqrt(ab_min) * x_ve
    vp_jump = math.sqrt(ab_max / ab_min) * x_vp + math.sqrt(1 - ab_max / ab_min) * s_noise * eps
    ve_jump = jump(x_ve, t_min, t_max, s_noise, torch.Generator().manual_seed(1))
    assert torch.allclose(vp_jump, math.sqrt(ab_max) * ve_jump, atol=1e-12, rtol=0)
    # the state-space conversion the VP scheduler performs gives the same thing
    assert torch.allclose(ve_jump / math.sqrt(1 + t_max**2), vp_jump, atol=1e-12, rtol=0)


def test_contraction_matches_closed_form():
    """Variance error e at t_min -> e (c^2 + t_min^2) / (c^2 + t_max^2); mean offset by its square root."""
    c, t_min, t_max = 0.5, 0.2, 1.0
    den = _gauss(c)
    grid = karras(12, t_min, t_max)[:-1]  # 12 points, 11 Heun steps
    # Heun on a linear denoiser is a linear map x -> g x
    g_heun = solvers.heun(den, torch.ones(1, 1, dtype=torch.float64), grid).item()
    factor = (c**2 + t_min**2) / (c**2 + t_max**2)
    assert g_heun == pytest.approx(math.sqrt(factor), rel=5e-3)
    e = c**2 + t_min**2  # a 100 % variance error at t_min
    e_after = g_heun**2 * (c**2 + t_max**2 + e) - (c**2 + t_min**2)
    assert e_after == pytest.approx(e * factor, rel=0.02)
    # sampled: restart segment from a wrong-variance, offset state
    gen = torch.Generator().manual_seed(0)
    n, m = 200_000, 0.3
    x = (m + math.sqrt(2 * (c**2 + t_min**2)) * torch.randn(n, 1, generator=gen, dtype=torch.float64))
    plan = RestartPlan(torch.cat([torch.tensor([t_min]), grid]).double(), torch.tensor([True] + [False] * 11))
    y = restart_sample(den, x, plan=plan, generator=gen)
    assert (y.var().item() - (c**2 + t_min**2)) == pytest.approx(e * factor, rel=0.05)
    assert y.mean().item() == pytest.approx(m * math.sqrt(factor), abs=0.01)


@pytest.mark.parametrize("steps", [19, 20, 35, 36, 50])
def test_a1111_step_totals(steps):
    n_main, segs = auto_segments(steps)
    assert n_main + sum(s.k * (s.n_steps - 1) for s in segs) == steps
    plan = auto_plan(steps, 0.0292, 14.6146)
    assert plan.num_steps == steps
    assert plan.nfe == 2 * steps - 1
    expected_k = 0 if steps < 20 else (1 if steps < 36 else 2)
    assert sum(s.k for s in segs) == expected_k


def test_determinism_and_dtype():
    den = _mixture()
    plan = get_preset("cifar10-vp-43").plan()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) * 80
    a = restart_sample(den, x, plan=plan, generator=torch.Generator().manual_seed(5))
    b = restart_sample(den, x, plan=plan, generator=torch.Generator().manual_seed(5))
    c = restart_sample(den, x, plan=plan, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32
    d = restart_sample(den, x.double(), plan=plan, generator=torch.Generator().manual_seed(5))
    assert d.dtype == torch.float64


def test_churn_and_callback():
    den = Counting(_mixture())
    main = karras(8, 0.002, 80.0)
    plan = build_plan(main, [(4, 2, 0.1, 0.8)], churn=0.05)
    # churned steps start inside [0.01, 1]: each in-segment step gets a small jump t -> 1.05 t
    churn_jumps = [(float(a), float(b)) for a, b, j in zip(plan.sigmas[:-1], plan.sigmas[1:], plan.jumps)
                   if j and abs(float(b) / float(a) - 1.05) < 1e-12]
    assert len(churn_jumps) == 2 * 3
    seen = []
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)) * 80
    gen = torch.Generator().manual_seed(0)
    restart_sample(den, x, plan=plan, generator=gen, callback=lambda d: seen.append(d["i"]))
    assert den.calls == plan.nfe == 2 * 8 - 1 + 2 * 2 * 3
    assert seen == list(range(plan.num_steps))


@pytest.mark.parametrize(
    "segments, match",
    [
        ([(3, 1, 0.5, 0.4)], "t_min < t_max"),
        ([(3, -1, 0.1, 0.5)], "k"),
        ([(1, 1, 0.1, 0.5)], "n_steps"),
        ([(3, 1, 0.1, 200.0)], "outside"),
        ([(3, 1, 1e-5, 0.5)], "outside"),
        ([(3, 1, 0.1)], "n_steps, k, t_min, t_max"),
    ],
)
def test_bad_segments_raise(segments, match):
    with pytest.raises(ValueError, match=match):
        build_plan(karras(10, 0.002, 80.0), segments)


def test_bad_inputs_raise():
    den = _mixture()
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="decreasing"):
        restart_sample(den, x, [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="plan"):
        restart_sample(den, x)
    with pytest.raises(ValueError, match="steps"):
        auto_segments(0)
    with pytest.raises(ValueError, match="preset"):
        get_preset("nope")


def test_stochastic_baselines_reduce_to_odes():
    den = _mixture()
    sig = karras(10, 0.002, 80.0)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    assert torch.equal(edm_sde(den, x, sig, s_churn=0.0), solvers.heun(den, x, sig))
    ref = solvers.euler(den, x, sig)
    assert torch.allclose(euler_ancestral(den, x, sig, eta=0.0), ref, atol=1e-12, rtol=0)
    plan = edm_churn_plan(sig, s_churn=40.0)
    assert plan.nfe == 2 * 10 - 1 and int(plan.jumps.sum()) > 0
    cd = Counting(den)
    a = euler_ancestral(cd, x, sig, generator=torch.Generator().manual_seed(1))
    assert cd.calls == 10
    assert torch.equal(a, euler_ancestral(den, x, sig, generator=torch.Generator().manual_seed(1)))


def test_restart_sampling_matches_mixture_statistics():
    """On an exact mixture, Restart samples have the mixture's mean and variance (quality sanity)."""
    den = _mixture()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64) * 80
    y = restart_sample(den, x, plan=get_preset("cifar10-vp-43").plan(), generator=g)
    w = den.weights
    mean = (w[:, None] * den.means).sum(0)
    second = (w[:, None] * (den.means**2 + den.stds[:, None] ** 2)).sum(0)
    assert torch.allclose(y.mean(0), mean, atol=0.05)
    assert torch.allclose(y.var(0), second - mean**2, rtol=0.08)
