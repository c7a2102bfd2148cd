"""LD3: parameterisation invariants, gradients through the solver, soft ball, errors."""

from __future__ import annotations

import pytest
import torch

from fastgen.core.analytic import GaussianMixtureDenoiser
from fastgen.core.solvers import dpmpp_2m
from fastgen.samplers.ld3 import clamp_offsets, learn_ld3, logits_to_knots, rmse_distance


def _mixture():
    return GaussianMixtureDenoiser(torch.ones(2) / 2, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
                                   stds=torch.tensor([0.2, 0.2]))


def test_knots_monotone_with_fixed_ends():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = 3 * torch.randn(6, generator=g, dtype=torch.float64)
        k = logits_to_knots(logits, 0.002, 80.0)
        assert k.shape == (7,)
        assert (k.diff() < 0).all()
        assert float(k[0]) == pytest.approx(80.0, rel=1e-12) and float(k[-1]) == pytest.approx(0.002, rel=1e-12)
    flat = logits_to_knots(torch.zeros(4, dtype=torch.float64), 0.01, 100.0)
    assert torch.allclose(flat, torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01], dtype=torch.float64))


def test_offsets_clamped_and_masked():
    knots = logits_to_knots(torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), 0.01, 10.0)
    off = clamp_offsets(torch.full((4,), 5.0, dtype=torch.float64), knots)
    width = 0.5 * float((knots[:-1].log() - knots[1:].log()).min())
    assert off[0] == 0 and off[-1] == 0
    assert torch.allclose(off[1:-1], torch.full((2,), width, dtype=torch.float64))


def test_gradients_through_solver_are_finite():
    den = _mixture()
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    knots = logits_to_knots(logits, 0.002, 80.0)
    sig = torch.cat([knots[:-1], knots.new_zeros(1)])
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    out = dpmpp_2m(den, x, sig)
    rmse_distance(out, torch.zeros_like(out)).mean().backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) > 0


def test_learn_returns_valid_schedule_and_improves():
    den = _mixture()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(24, 2, generator=g, dtype=torch.float64)
    s = learn_ld3(den, noise, solver="euler", nfe=4, iterations=30, generator=g, progress=False)
    assert s.ends_in_zero and s.steps == 4 and s.num_evals() == 4
    assert (s.sigmas.diff() < 0).all() and float(s.sigmas[0]) == pytest.approx(80.0)
    assert s.eval_sigmas is not None and float(s.eval_sigmas[0]) == pytest.approx(80.0)
    ratio = (s.eval_sigmas[1:-1] / s.sigmas[1:-1]).log().abs()
    gaps = (s.sigmas[:-2].log() - s.sigmas[1:-1].log()).min()
    assert float(ratio.max()) <= 0.5 * float(gaps) + 1e-9
    assert s.objective <= s.meta["initial_validation"]
    assert s.meta["ball_radius"] == pytest.approx(0.001 * 2 / 16)


def test_bad_input():
    den = _mixture()
    noise = torch.randn(8, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="too small for solver 'heun'"):
        learn_ld3(den, noise, solver="heun", nfe=2, progress=False)
    with pytest.raises(ValueError, match="too small"):
        learn_ld3(den, noise, solver="euler", nfe=1, progress=False)
    with pytest.raises(ValueError, match="noise"):
        learn_ld3(den, noise[:1], progress=False)
    with pytest.raises(ValueError, match="solver must be one of"):
        learn_ld3(den, noise, solver="rk4", progress=False)
    den.sigma_min, den.sigma_max = 0.01, 10.0
    with pytest.raises(ValueError, match="below the model's sigma_min"):
        learn_ld3(den, noise, sigma_min=0.001, progress=False)


def test_soft_ball_latents_stay_inside_the_ball():
    """The learned latents never leave B(noise, r); with r = 0 (hard loss) nothing moves."""
    den = _mixture()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(12, 2, generator=g, dtype=torch.float64)
    s = learn_ld3(den, noise, solver="dpmpp_2m", nfe=4, iterations=8, ball_radius=0.05, generator=g,
                  progress=False)
    assert s.meta["latent_moves_accepted"] > 0
    assert 0 < s.meta["max_latent_shift"] <= 0.05 + 1e-12
    s0 = learn_ld3(den, noise, solver="dpmpp_2m", nfe=4, iterations=8, ball_radius=0.0, generator=g,
                   progress=False)
    assert s0.meta["latent_moves_accepted"] == 0 and s0.meta["max_latent_shift"] == 0.0


def test_init_from_a_schedule_reproduces_it():
    from fastgen.core.schedules import karras
    from fastgen.samplers.ld3 import init_logits

    sig = karras(5, 0.05, 80.0)  # 5 steps ending in 0, last positive 0.05
    knots = logits_to_knots(init_logits(sig, 5, 0.002, 80.0), 0.002, 80.0)
    assert torch.allclose(knots[:-1], sig[:-1], rtol=1e-9)
    assert float(knots[-1]) == pytest.approx(0.002)
    flat = logits_to_knots(init_logits("karras", 4, 0.002, 80.0), 0.002, 80.0)
    assert torch.allclose(flat, karras(5, 0.002, 80.0)[:-1], rtol=1e-9)
    with pytest.raises(ValueError, match="init schedule must have 6 sigmas"):
        init_logits(karras(3, 0.05, 80.0), 5, 0.002, 80.0)


def _official_ld3_steps(solver: str, nfe: int) -> int:
    """The official LD3 code: a Heun step costs two calls, every other solver one (NFE // order)."""
    return nfe // 2 if solver == "heun" else nfe


@pytest.mark.parametrize("solver,nfe", [("heun", 7), ("heun", 8), ("heun", 5), ("dpmpp_2m", 7), ("euler", 4)])
def test_step_count_and_radius_follow_the_official_code(solver, nfe):
    from fastgen.samplers.ld3 import ball_radius_for, ld3_steps

    steps = _official_ld3_steps(solver, nfe)
    assert ld3_steps(solver, nfe) == steps
    # CIFAR-10 (d = 3 * 32 * 32): the official radius 0.001 d / N^2; NFE 7 with Heun -> N = 3 -> 0.3413
    assert ball_radius_for(3072, steps) == pytest.approx(0.001 * 3072 / steps**2, rel=1e-15)
    if (solver, nfe) == ("heun", 7):
        assert round(ball_radius_for(3072, steps), 3) == 0.341


def test_heun_schedule_has_official_steps_and_radius():
    den = GaussianMixtureDenoiser(torch.ones(2) / 2, torch.stack([torch.full((3072,), -0.5), torch.full((3072,), 0.5)]),
                                  stds=torch.tensor([0.3, 0.3]))
    noise = torch.randn(4, 3072, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = learn_ld3(den, noise, solver="heun", nfe=7, iterations=2, progress=False,
                  generator=torch.Generator().manual_seed(1))
    assert s.steps == 3 and s.num_evals() == 5  # 3 Heun steps; the step to 0 is one Euler call
    assert s.meta["ball_radius"] == pytest.approx(0.3413, abs=1e-4)


def test_minibatch_rounds_and_validation_latents():
    den = _mixture()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(12, 2, generator=g, dtype=torch.float64)
    # 6 training noises in minibatches of 2: 3 steps per round, (1 + 2) rounds -> 9 optimiser steps
    s = learn_ld3(den, noise, solver="euler", nfe=4, rounds=(1, 2), batch_size=2, optimize_val_latents=True,
                  ball_radius=0.05, patience=100, generator=g, progress=False)
    assert s.meta["iterations"] == 9 and s.meta["rounds"] == [1, 2]
    assert 0 < s.meta["max_val_latent_shift"] <= 0.05 + 1e-12
    assert s.meta["max_latent_shift"] <= 0.05 + 1e-12
    hard = learn_ld3(den, noise, solver="euler", nfe=4, rounds=(1, 2), batch_size=2, ball_radius=0.05,
                     patience=100, generator=torch.Generator().manual_seed(0), progress=False)
    assert hard.meta["max_val_latent_shift"] == 0.0
    with pytest.raises(ValueError, match="rounds"):
        learn_ld3(den, noise, solver="euler", nfe=4, rounds=(0, 0), progress=False)
