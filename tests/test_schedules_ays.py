"""AYS: published values, interpolation, KLUB importance sampling and refinement on Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.core.analytic import GaussianMixtureDenoiser
from fastgen.samplers.ays import (
    AYS_SIGMAS,
    _draw,
    _refine_group,
    ays_sigmas,
    ays_timesteps,
    for_solver,
    optimize_ays,
)
from fastgen.samplers.klub import _proposal, gaussian_gap, kl_optimal_gaussian, klub_intervals

C = 0.5


def test_published_values_exact():
    assert ays_sigmas("sd15", 10).tolist() == [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399,
                                               0.152, 0.029]
    assert ays_sigmas("sdxl").tolist() == [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113,
                                           0.029]
    assert ays_sigmas("svd").tolist() == [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034,
                                          0.002]
    assert ays_timesteps("sd15") == [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0]
    assert ays_timesteps("sdxl") == [999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0]
    with pytest.raises(ValueError, match="continuous"):
        ays_timesteps("svd")
    with pytest.raises(ValueError, match="model must be one of"):
        ays_sigmas("sd3", 10)
    with pytest.raises(ValueError, match="n"):
        ays_sigmas("sd15", 0)


@pytest.mark.parametrize("model", sorted(AYS_SIGMAS))
def test_interpolation_rule(model):
    ten = ays_sigmas(model, 10)
    twenty = ays_sigmas(model, 20)
    assert twenty.shape == (21,)
    assert torch.allclose(twenty[0::2], ten, rtol=1e-12)  # old knots kept (exp(log) round trip)
    geo = (ten[:-1] * ten[1:]).sqrt()  # new knots: geometric means of their neighbours
    assert torch.allclose(twenty[1::2], geo, rtol=1e-12)
    if model == "sd15":
        assert float(twenty[1]) == pytest.approx(9.728, abs=5e-4)
    five = ays_sigmas(model, 5)
    assert torch.allclose(five, ten[0::2], rtol=1e-12)  # 5 steps = every other published knot
    assert (ays_sigmas(model, 7).diff() < 0).all()


def test_gaussian_klub_importance_sampling_matches_closed_form():
    """On N(0, c^2 I) data the IS weight is exact, so the KLUB estimate equals Z within MC error."""
    den = GaussianMixtureDenoiser(torch.ones(1), torch.zeros(1, 4), stds=torch.tensor([C]))
    g = torch.Generator().manual_seed(0)
    data = C * torch.randn(20000, 4, generator=g, dtype=torch.float64)
    x0, e1, e2, u, _ = _draw(data, None, 20000, g)
    lo, hi = torch.tensor([0.1, 0.5, 2.0]), torch.tensor([1.0, 3.0, 80.0])
    est = klub_intervals(den, lo, hi, x0, e1, e2, u)
    _, gt, z = _proposal(lo.double(), hi.double(), u)
    assert torch.allclose(est, z, rtol=0.02)
    # Z itself against direct quadrature of t^-3 g(t, hi) on [0.1, 1]
    t = torch.linspace(0.1, 1.0, 200001, dtype=torch.float64)
    quad = torch.trapezoid(t**-3 * gaussian_gap(t, torch.tensor(1.0, dtype=torch.float64)), t)
    assert float(z[0]) == pytest.approx(float(quad), rel=1e-3)
    assert (gt > 0).all()


def test_refinement_reaches_klub_optimal_point():
    """Between a = 0.1 and b = 1 the KLUB-optimal point is 0.2306 (the KL-optimal one is 0.382)."""
    den = GaussianMixtureDenoiser(torch.ones(1), torch.zeros(1, 4), stds=torch.tensor([C]))
    g = torch.Generator().manual_seed(1)
    data = C * torch.randn(4000, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.6, 1.0], dtype=torch.float64)
    for _ in range(3):
        x0, e1, e2, u, _ = _draw(data, None, 2000, g)
        t = _refine_group(den, t, torch.tensor([1]), 61, x0, e1, e2, u, {})
    a, b = 0.1, 1.0
    opt = math.sqrt(a * b * (a * b + math.sqrt((a * a + C * C) * (b * b + C * C))) / (a * a + b * b + C * C))
    assert opt == pytest.approx(0.2306, abs=1e-4)
    assert float(t[1]) == pytest.approx(opt, rel=0.03)
    kl_opt = C * math.tan(0.5 * (math.atan(a / C) + math.atan(b / C)))  # Thm 3.1, n = 2
    assert kl_opt == pytest.approx(0.382, abs=1e-3)


def test_optimizer_output_and_subdivision():
    den = GaussianMixtureDenoiser(torch.ones(2) / 2, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
                                  stds=torch.tensor([0.2, 0.2]))
    g = torch.Generator().manual_seed(0)
    data = torch.randn(500, 2, generator=g, dtype=torch.float64) * 0.2 + torch.tensor([1.0, 0.0])
    s = optimize_ays(den, data, n=4, subdivisions=1, iterations=2, num_samples=32, generator=g, progress=False,
                     sigma_min=0.01, sigma_max=20.0)
    assert s.sigmas.shape == (9,) and s.method == "ays"
    assert float(s.sigmas[0]) == 20.0 and float(s.sigmas[-1]) == pytest.approx(0.01)
    assert (s.sigmas.diff() < 0).all()
    assert s.meta["levels"] == [4, 8] and math.isfinite(s.objective)
    ready = for_solver(s, "heun", 6)
    assert ready.ends_in_zero and ready.steps == 3 and ready.num_evals() == 5


def test_bad_input():
    den = GaussianMixtureDenoiser(torch.ones(1), torch.zeros(1, 2), stds=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="empty"):
        optimize_ays(den, torch.zeros(0, 2), progress=False)
    with pytest.raises(ValueError, match="sigma_min"):
        optimize_ays(den, torch.zeros(4, 2), sigma_min=5.0, sigma_max=1.0, progress=False)
    den.sigma_min, den.sigma_max = 0.01, 10.0
    with pytest.raises(ValueError, match="above the model's sigma_max"):
        optimize_ays(den, torch.zeros(4, 2), sigma_max=80.0, progress=False)
    with pytest.raises(ValueError, match="below the model's sigma_min"):
        optimize_ays(den, torch.zeros(4, 2), sigma_min=0.002, progress=False)
    with pytest.raises(ValueError, match="n must be"):
        optimize_ays(den, torch.zeros(4, 2), n=1, progress=False)
    with pytest.raises(ValueError, match="too small for solver 'heun'"):
        optimize_ays(den, torch.zeros(4, 2), solver="heun", nfe=2, progress=False)
    with pytest.raises(ValueError, match="val_noise"):
        optimize_ays(den, torch.zeros(4, 2), val_noise=4, progress=False)


def test_kl_optimal_gaussian_arctan_midpoint_rule():
    t = kl_optimal_gaussian(8, 0.002, 80.0, C)
    assert float(t[0]) == pytest.approx(80.0) and float(t[-1]) == pytest.approx(0.002)
    a = torch.atan(t / C)
    assert torch.allclose(a[1:-1], 0.5 * (a[:-2] + a[2:]), atol=1e-12)
    assert float(kl_optimal_gaussian(2, 0.1, 1.0, C)[1]) == pytest.approx(0.382, abs=1e-3)


def test_early_stopping_along_the_path_never_loses_to_its_start():
    """With a validator the result scores no worse than the better of Karras and log-linear (the "auto"
    start) and no worse than any point the refinement path passed through at the scored fractions."""
    from fastgen.core.schedules import karras as karras_sigmas
    from fastgen.core.schedules import loglinear

    den = GaussianMixtureDenoiser(torch.ones(2) / 2, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
                                  stds=torch.tensor([0.3, 0.3]))
    g = torch.Generator().manual_seed(0)
    data = torch.randn(400, 2, generator=g, dtype=torch.float64) * 0.3 + torch.tensor([1.0, 0.0])
    seen = []

    def validate(knots):  # a stand-in score: distance of log-knots from a fixed target schedule
        target = loglinear(5, 0.01, 20.0)[:-1].log()
        score = float((knots.log() - target).abs().sum())
        seen.append(score)
        return score

    s = optimize_ays(den, data, n=4, iterations=2, num_samples=32, validate=validate, generator=g,
                     progress=False, sigma_min=0.01, sigma_max=20.0)
    starts = [validate(karras_sigmas(5, 0.01, 20.0)[:-1]), validate(loglinear(5, 0.01, 20.0)[:-1])]
    assert s.meta["init"] == "loglinear"  # the target is log-linear: it wins the start
    best = validate(s.sigmas)
    assert best <= min(starts) + 1e-12 and best == pytest.approx(min(seen[:-3]), abs=1e-12)
    rec = [h for h in s.meta["history"] if "best_score" in h][-1]
    assert rec["best_score"] == pytest.approx(best, abs=1e-12) and rec["path_length"] == 4
