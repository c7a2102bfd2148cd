"""Done-when check: every optimizer beats the Karras schedule (same solver, same NFE) in endpoint error
to the reference ODE on held-out noises, on an exact Gaussian mixture and on the smooth digits test bed."""

from __future__ import annotations

import pytest
import torch

from fastgen.core.analytic import EmpiricalDenoiser
from fastgen.core.ode import reference_solve
from fastgen.core.schedules import karras
from fastgen.data import load_digits_split
from fastgen.data.toy import ring_mixture
from fastgen.samplers.ays import for_solver, optimize_ays
from fastgen.samplers.dp import dp_schedules
from fastgen.samplers.ld3 import learn_ld3
from fastgen.samplers.schedule import endpoint_rmse, steps_within_nfe

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NFES = (4, 6, 8)
SOLVERS = ("euler", "heun", "dpmpp_2m", "ipndm")


@pytest.fixture(scope="module", params=["mixture", pytest.param("digits", marks=pytest.mark.slow)])
def bed(request):
    g = torch.Generator().manual_seed(0)
    if request.param == "mixture":
        mix = ring_mixture()
        den = mix.denoiser()
        data, _ = mix.sample(2000, g, dtype=torch.float64)
        shape = (2,)
    else:
        data = load_digits_split("train").images.double()
        den = EmpiricalDenoiser(data, bandwidth=0.25)
        shape = (1, 8, 8)
    held_out = torch.randn(64, *shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    ref = reference_solve(den, held_out * SIGMA_MAX, SIGMA_MAX)
    return {"name": request.param, "den": den, "data": data, "shape": shape, "noise": held_out, "ref": ref}


def _karras_err(bed, solver, nfe):
    sig = karras(steps_within_nfe(solver, nfe), SIGMA_MIN, SIGMA_MAX)
    return endpoint_rmse(bed["den"], sig, bed["noise"], bed["ref"], solver)


def test_ld3_beats_karras(bed):
    g = torch.Generator().manual_seed(1)
    train = torch.randn(32, *bed["shape"], generator=g, dtype=torch.float64)
    for solver in SOLVERS:
        for nfe in NFES:
            s = learn_ld3(bed["den"], train, solver=solver, nfe=nfe, iterations=40, generator=g, progress=False)
            assert s.num_evals() <= nfe
            err = endpoint_rmse(bed["den"], s, bed["noise"], bed["ref"])
            assert err < _karras_err(bed, solver, nfe), (bed["name"], solver, nfe)


def test_dp_beats_karras(bed):
    g = torch.Generator().manual_seed(2)
    train = torch.randn(48, *bed["shape"], generator=g, dtype=torch.float64)
    for solver in SOLVERS:
        scheds = dp_schedules(bed["den"], train, NFES, solver=solver, grid_size=32, progress=False)
        for nfe in NFES:
            err = endpoint_rmse(bed["den"], scheds[nfe], bed["noise"], bed["ref"])
            assert err < _karras_err(bed, solver, nfe), (bed["name"], solver, nfe)


def test_ays_beats_karras(bed):
    g = torch.Generator().manual_seed(3)
    for solver in ("euler", "dpmpp_2m"):
        for nfe in NFES:
            knots = optimize_ays(bed["den"], bed["data"], iterations=3, num_samples=128, solver=solver,
                                 nfe=nfe, val_noise=32, generator=g, progress=False)
            s = for_solver(knots, solver, nfe)
            assert s.num_evals() == nfe
            err = endpoint_rmse(bed["den"], s, bed["noise"], bed["ref"])
            assert err < _karras_err(bed, solver, nfe), (bed["name"], solver, nfe)
