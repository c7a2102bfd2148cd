"""auto_schedule: the best solver + schedule by held-out error, with runner-up margins."""

from __future__ import annotations

import pytest
import torch

from fastgen.core.ode import reference_solve
from fastgen.core.schedules import karras
from fastgen.core.solvers import SOLVERS, steps_for_nfe
from fastgen.data.toy import ring_mixture
from fastgen.samplers.auto import auto_schedule
from fastgen.samplers.schedule import Schedule, endpoint_rmse


def test_auto_schedule_picks_the_held_out_best():
    den = ring_mixture().denoiser()
    g = torch.Generator().manual_seed(0)
    fit = torch.randn(32, 2, generator=g, dtype=torch.float64)
    held = torch.randn(48, 2, generator=g, dtype=torch.float64)
    best = auto_schedule(den, 6, fit, held, dp_options={"grid_size": 24, "coeff": [1.0, 1.2]},
                         sigma_min=0.002, sigma_max=80.0, model_id="ring")
    info = best.meta["auto"]
    errs = [e for _, _, e in info["ranking"]]
    assert errs == sorted(errs) and len(errs) == 3 * len(SOLVERS)
    assert {s for s, _, _ in info["ranking"]} == set(SOLVERS)
    # the recorded error is the held-out endpoint RMSE of the returned schedule, recomputed here
    ref = reference_solve(den, held * 80.0, 80.0, 0.0)
    assert endpoint_rmse(den, best, held, ref) == pytest.approx(info["held_out_error"], rel=1e-12)
    # and it beats Karras with every solver
    for solver in SOLVERS:
        k = Schedule(karras(steps_for_nfe(solver, 6, exact=False), 0.002, 80.0), solver=solver)
        assert info["held_out_error"] <= endpoint_rmse(den, k, held, ref)
    assert info["runner_up_margin"] >= 1.0 and all(m >= 1.0 for m in info["margins"].values())
    assert best.solver not in info["margins"] and best.model == "ring" and best.num_evals() <= 6


def test_auto_schedule_bad_input():
    den = ring_mixture().denoiser()
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="solvers must be among"):
        auto_schedule(den, 4, x, x, solvers=["rk4"])
    with pytest.raises(ValueError, match="methods among"):
        auto_schedule(den, 4, x, x, methods=["magic"])
    with pytest.raises(ValueError, match="held_out"):
        auto_schedule(den, 4, x, x[:1])


def test_auto_schedules_every_nfe_from_one_pass_equals_single_calls():
    from fastgen.samplers.auto import auto_schedules

    den = ring_mixture().denoiser()
    g = torch.Generator().manual_seed(4)
    fit = torch.randn(16, 2, generator=g, dtype=torch.float64)
    held = torch.randn(24, 2, generator=g, dtype=torch.float64)
    kw = {"solvers": ["euler", "ipndm", "unipc3"], "dp_options": {"grid_size": 16}, "sigma_min": 0.002,
          "sigma_max": 80.0}
    ref = reference_solve(den, held * 80.0, 80.0, 0.0)
    many = auto_schedules(den, [4, 6], fit, held, held_out_reference=ref, **kw)
    for nfe in (4, 6):
        one = auto_schedule(den, nfe, fit, held, **kw)
        a, b = many[nfe].meta["auto"]["ranking"], one.meta["auto"]["ranking"]
        assert [r[:2] for r in a] == [r[:2] for r in b]
        assert [r[2] for r in a] == pytest.approx([r[2] for r in b], rel=1e-12)
        assert torch.equal(many[nfe].sigmas, one.sigmas) and many[nfe].solver == one.solver
        assert many[nfe].num_evals() <= nfe
