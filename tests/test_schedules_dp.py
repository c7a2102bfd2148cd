"""GITS/BOSS dynamic programming: exactness against brute force, coefficient, cost matrix."""

from __future__ import annotations

import pytest
import torch

from fastgen.core.analytic import GaussianMixtureDenoiser
from fastgen.core.schedules import karras
from fastgen.samplers.dp import brute_force_select, cost_matrix, dp_schedule, dp_select, dp_select_all


@pytest.mark.parametrize("coeff", [1.0, 1.2])
@pytest.mark.parametrize("k", [6, 12])
def test_dp_equals_brute_force(k, coeff):
    g = torch.Generator().manual_seed(k)
    cost = torch.rand(k + 1, k + 1, generator=g, dtype=torch.float64) * torch.rand(k + 1, 1, generator=g)
    paths = dp_select_all(cost, k, coeff)
    for steps in range(1, k + 1):
        path, total = paths[steps]
        bf_path, bf_total = brute_force_select(cost, steps, coeff)
        assert total == pytest.approx(bf_total, rel=1e-12)
        assert path == bf_path
        assert path[0] == 0 and path[-1] == k and len(path) == steps + 1


def test_coeff_one_is_boss_sum():
    """coeff = 1 minimises the plain sum of step costs (BOSS); coeff changes the weighting."""
    cost = torch.full((4, 4), 10.0, dtype=torch.float64)
    cost[0, 3] = 5.0  # direct
    cost[0, 1], cost[1, 3] = 1.0, 3.5  # 2 steps, total 4.5
    cost[0, 2], cost[2, 3] = 2.0, 2.0  # 2 steps, total 4.0 (best for coeff 1)
    assert dp_select(cost, 2, 1.0) == [0, 2, 3]
    assert dp_select(cost, 2, 0.5) == [0, 1, 3]  # 1 + 0.5 * 3.5 = 2.75 < 2 + 1 = 3
    assert dp_select(cost, 1, 1.0) == [0, 3]
    with pytest.raises(ValueError, match="max_steps"):
        dp_select_all(cost, 4)
    with pytest.raises(ValueError, match="square"):
        dp_select_all(torch.zeros(3, 4), 1)


def test_cost_matrix_zero_for_exact_affine_flow():
    """For Gaussian data the ODE is affine in sigma with D linear: one Euler step is exact for a point mass
    (D constant), so every cost vanishes."""
    den = GaussianMixtureDenoiser(torch.ones(1), torch.tensor([[1.0, -2.0]]), stds=torch.tensor([1e-9]))
    grid = karras(6, 0.01, 10.0)
    x_t = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    states = torch.stack([mean + (s / 10.0) * (x_t - mean) for s in grid])
    for metric in ("l2", "l1", "dev", "mse", "abs_dev"):
        c = cost_matrix(den, grid, states, metric=metric)
        finite = c[torch.isfinite(c)]
        assert finite.numel() == 7 * 6 // 2 and float(finite.abs().max()) < 1e-10
    with pytest.raises(ValueError, match="metric"):
        cost_matrix(den, grid, states, metric="lpips")


def test_dp_schedule_valid_and_errors():
    den = GaussianMixtureDenoiser(torch.ones(2) / 2, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
                                  stds=torch.tensor([0.2, 0.2]))
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = dp_schedule(den, noise, 5, solver="heun", grid_size=12, coeff=[1.0, 1.2], progress=False)
    assert s.ends_in_zero and s.steps == 3 and s.num_evals() == 5 and s.method == "dp"
    assert (s.sigmas.diff() < 0).all() and float(s.sigmas[0]) == pytest.approx(80.0)
    with pytest.raises(ValueError, match="grid_size"):
        dp_schedule(den, noise, 8, solver="euler", grid_size=6, progress=False)
    with pytest.raises(ValueError, match="nfe"):
        dp_schedule(den, noise, 0, progress=False)
    den.sigma_min, den.sigma_max = 0.01, 10.0
    with pytest.raises(ValueError, match="sigma_max"):
        dp_schedule(den, noise, 4, sigma_max=80.0, progress=False)


@pytest.mark.parametrize("grid", ["karras", "loglinear", "flow"])
def test_dp_picks_its_steps_from_the_named_grid(grid):
    """Every chosen sigma is a point of the named fine grid (K sigmas + 0), which the schedule records."""
    from fastgen.core import schedules as S
    from fastgen.samplers.dp import GRIDS, dp_schedules

    den = GaussianMixtureDenoiser(torch.ones(2) / 2, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
                                  stds=torch.tensor([0.2, 0.2]))
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = dp_schedules(den, noise, [3, 5], solver="euler", grid_size=12, grid=grid, sigma_min=0.01,
                       sigma_max=100.0, progress=False)
    fine = GRIDS[grid](12, 0.01, 100.0, 7.0)
    expect = {"karras": S.karras(12, 0.01, 100.0), "loglinear": S.loglinear(12, 0.01, 100.0),
              "flow": S.flow_uniform(12, 0.01, 100.0)}[grid]
    torch.testing.assert_close(fine, expect, rtol=0, atol=0)
    for nfe, s in out.items():
        assert s.meta["grid"] == grid and s.steps == nfe
        torch.testing.assert_close(s.sigmas, fine[s.meta["grid_indices"]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="grid must be one of"):
        dp_schedules(den, noise, [3], grid="cosine", progress=False)


def test_dp_is_never_worse_than_the_grids_uniform_subsample():
    """The uniform subsample of the fine grid is a candidate: the chosen path's endpoint error on the DP
    noises is <= that of every K/n-th grid point (float64 exact mixture: equal when it wins)."""
    from fastgen.core.ode import reference_solve
    from fastgen.core.solvers import get_solver
    from fastgen.samplers.dp import GRIDS, dp_schedules

    den = GaussianMixtureDenoiser(torch.ones(3) / 3, torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]),
                                  stds=torch.tensor([0.1, 0.3, 0.2]))
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = dp_schedules(den, noise, [3, 4, 6], solver="dpmpp_2m", grid_size=12, grid="flow", sigma_min=0.01,
                       sigma_max=100.0, progress=False)
    fine = GRIDS["flow"](12, 0.01, 100.0, 7.0)
    ref = reference_solve(den, noise * 100.0, 100.0)  # dopri5 at DP's rtol 1e-5: |diff| << 1e-4
    for k, s in out.items():
        uniform = sorted({round(i * 12 / k) for i in range(k + 1)})
        x = get_solver("dpmpp_2m")(den, noise * 100.0, fine[uniform])
        u_err = float(((x - ref) ** 2).mean().sqrt())
        assert s.objective <= u_err + 1e-4, (k, s.objective, u_err)
