"""The learned solver: exact start at its base, a held-out gain on an exact mixture, options, JSON replay."""

from __future__ import annotations

import json

import pytest
import torch

from fastgen.core.analytic import GaussianMixtureDenoiser
from fastgen.core.ode import reference_solve
from fastgen.core.schedules import karras
from fastgen.core.solvers import get_solver, heun
from fastgen.samplers.auto import auto_schedules
from fastgen.samplers.learned_solver import COMBINABLE_SOLVERS, LearnedSolverOptions, learn_solver
from fastgen.samplers.schedule import Schedule, endpoint_rmse

LO, HI = 0.002, 80.0


def _mixture() -> GaussianMixtureDenoiser:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 4, generator=g, dtype=torch.float64)
    return GaussianMixtureDenoiser(torch.ones(4) / 4, means, stds=torch.full((4,), 0.5, dtype=torch.float64))


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("solver", COMBINABLE_SOLVERS)
def test_zero_correction_is_the_base_solver(solver):
    den, x = _mixture(), _noise(16, 1)
    base = Schedule(karras(5, LO, HI), method="karras", solver=solver, nfe=5)
    want = get_solver(solver)(den, x * HI, base.solver_sigmas())
    zero = Schedule(base.sigmas, method="learned", solver=solver, nfe=5, coefficients=torch.zeros(5, 3))
    assert torch.equal(zero.sample(den, x), want)  # C = 0 adds exact zeros
    # the learner's start (iterations=0) rebuilds the knots through LD3's logits: float tolerance
    start = learn_solver(den, _noise(8, 2), base, iterations=0, sigma_min=LO, sigma_max=HI, progress=False)
    assert start.method == "learned" and start.solver == solver and torch.count_nonzero(start.coefficients) == 0
    assert torch.allclose(start.sigmas, base.sigmas, rtol=1e-12, atol=0)
    assert torch.allclose(start.sample(den, x), want, rtol=1e-10, atol=1e-10)


def test_zero_correction_keeps_ld3_eval_sigmas():
    den, x = _mixture(), _noise(16, 1)
    sig = karras(4, LO, HI)
    ev = sig.clone()
    ev[1:-1] *= torch.tensor([1.1, 0.9, 1.05], dtype=torch.float64)
    base = Schedule(sig, method="ld3", solver="dpmpp_2m", nfe=4, eval_sigmas=ev)
    start = learn_solver(den, _noise(8, 2), base, iterations=0, sigma_min=LO, sigma_max=HI, progress=False)
    assert torch.allclose(start.eval_sigmas, ev, rtol=1e-12, atol=0)
    assert torch.allclose(start.sample(den, x), base.sample(den, x), rtol=1e-10, atol=1e-10)


def test_learned_solver_reduces_held_out_error():
    den = _mixture()
    fit, held = _noise(48, 3), _noise(200, 4)
    ref = reference_solve(den, held * HI, HI, 0.0)
    base = Schedule(karras(4, LO, HI), method="karras", solver="dpmpp_2m", nfe=4)
    learned = learn_solver(den, fit, base, iterations=60, sigma_min=LO, sigma_max=HI, progress=False,
                           generator=torch.Generator().manual_seed(1))
    coeffs_only = learn_solver(den, fit, base, iterations=60, learn_schedule=False, sigma_min=LO, sigma_max=HI,
                               progress=False, generator=torch.Generator().manual_seed(1))
    e_base = endpoint_rmse(den, base, held, ref)
    # measured: 0.2547 -> 0.0995 (0.39x) with schedule + coefficients
    assert endpoint_rmse(den, learned, held, ref) <= 0.6 * e_base
    # the coefficients alone (fixed Karras knots) already help
    assert torch.allclose(coeffs_only.sigmas, base.sigmas, rtol=1e-12, atol=0)
    assert endpoint_rmse(den, coeffs_only, held, ref) <= 0.9 * e_base
    assert learned.num_evals() == 4 and learned.coefficients.shape == (4, 3)


@pytest.mark.parametrize("option, value", [
    ("history", 0), ("history", 5), ("iterations", -1), ("lr", 0.0), ("lr_schedule", float("nan")),
    ("l2", -1.0), ("patience", 0), ("max_reductions", -1), ("batch_size", 0), ("train_fraction", 1.0),
    ("loss", "l1"), ("decoupled", "yes"),
])
def test_bad_options_name_the_option(option, value):
    base = Schedule(karras(4, LO, HI), solver="unipc", nfe=4)
    with pytest.raises(ValueError, match=option):
        learn_solver(_mixture(), _noise(8, 0), base, progress=False, **{option: value})
    with pytest.raises(ValueError, match=option):
        LearnedSolverOptions(**{option: value}).check()


def test_bad_bases_and_coefficients():
    den, noise = _mixture(), _noise(8, 0)
    with pytest.raises(ValueError, match="base"):
        learn_solver(den, noise, Schedule(karras(4, LO, HI), solver="heun"), progress=False)
    with pytest.raises(ValueError, match="base"):
        learn_solver(den, noise, karras(4, LO, HI), progress=False)
    with pytest.raises(ValueError, match="sigma_max"):
        learn_solver(den, noise, Schedule(karras(4, LO, 40.0), solver="unipc"), sigma_max=HI, progress=False)
    sig = karras(3, LO, HI)
    with pytest.raises(ValueError, match="shape"):
        Schedule(sig, solver="unipc", coefficients=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="0 for j >= i"):
        Schedule(sig, solver="unipc", coefficients=torch.ones(3, 2))
    with pytest.raises(ValueError, match="solver"):
        Schedule(sig, solver="heun", coefficients=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="coefficients"):
        Schedule.from_dict({"sigmas": sig.tolist(), "solver": "unipc", "coefficients": [[0.0], [1.0, 2.0]]})
    # the replay denoiser refuses a solver that calls it off its knots (Heun's corrector)
    s = Schedule(sig, solver="euler", coefficients=torch.tensor([[0.0], [0.1], [0.2]], dtype=torch.float64))
    with pytest.raises(ValueError, match="knot"):
        heun(s.wrap(den), noise * HI, s.solver_sigmas())


def test_json_round_trip_replays_bit_identically(tmp_path):
    den = _mixture()
    base = Schedule(karras(5, LO, HI), method="karras", solver="ipndm", nfe=5)
    learned = learn_solver(den, _noise(24, 5), base, iterations=15, sigma_min=LO, sigma_max=HI, progress=False,
                           generator=torch.Generator().manual_seed(0), model_id="mix4")
    assert torch.count_nonzero(learned.coefficients) > 0
    back = Schedule.load(learned.save(tmp_path / "learned.json"))
    assert json.loads((tmp_path / "learned.json").read_text())["coefficients"] == learned.coefficients.tolist()
    assert torch.equal(back.coefficients, learned.coefficients) and torch.equal(back.eval_sigmas, learned.eval_sigmas)
    x = _noise(32, 6)
    assert torch.equal(back.sample(den, x), learned.sample(den, x))
    assert "coefficients" in back.summary()


def test_auto_schedules_offers_learned_candidates():
    den = _mixture()
    fit, held = _noise(32, 7), _noise(64, 8)
    best = auto_schedules(den, [4], fit, held, solvers=["euler", "dpmpp_2m"], methods=("karras", "learned"),
                          sigma_min=LO, sigma_max=HI, learned_bases=2,
                          learned_options=LearnedSolverOptions(iterations=20),
                          generator=torch.Generator().manual_seed(0))[4]
    methods = [m for _, m, _ in best.meta["auto"]["ranking"]]
    assert methods.count("learned") == 2 and methods.count("karras") == 2
    with pytest.raises(ValueError, match="learned_bases"):
        auto_schedules(den, [4], fit, held, methods=("karras", "learned"), learned_bases=0)
    # several option sets: each runs from every base and is scored like any candidate
    two = (LearnedSolverOptions(iterations=20), LearnedSolverOptions(iterations=20, lr=0.005, lr_schedule=0.0025))
    best = auto_schedules(den, [4], fit, held, solvers=["euler", "dpmpp_2m"], methods=("karras", "learned"),
                          sigma_min=LO, sigma_max=HI, learned_bases=2, learned_options=two,
                          generator=torch.Generator().manual_seed(0))[4]
    methods = [m for _, m, _ in best.meta["auto"]["ranking"]]
    assert methods.count("learned") == 4 and methods.count("karras") == 2
    for bad in ([], 0.01, [LearnedSolverOptions(), "fast"]):
        with pytest.raises(ValueError, match="learned_options must be"):
            auto_schedules(den, [4], fit, held, methods=("karras", "learned"), learned_options=bad)


def test_cli_auto_learned_json_replays_in_fastgen_sample(tmp_path):
    import numpy as np

    from fastgen.cli import main

    out = tmp_path / "learned.json"
    assert main(["schedule", "auto", "--model", "ring-mixture", "--nfe", "4", "--solvers", "ipndm",
                 "--methods", "karras,learned", "--num-noise", "16", "--held-out", "16", "--learned-iterations", "10",
                 "--out", str(out), "--no-progress"]) == 0
    s = Schedule.load(out)
    # one karras candidate and one learned solver per option set of DEFAULT_LEARNED_OPTIONS (two)
    assert sorted(m for _, m, _ in s.meta["auto"]["ranking"]) == ["karras", "learned", "learned"]
    s.method, s.coefficients = "learned", torch.tensor([[0.0] * 3, [0.3, 0, 0], [0.2, -0.1, 0], [0.1, 0.1, 0.1]])
    s.save(out)  # a non-trivial combination, whatever the short search chose
    plain = Schedule(s.sigmas, solver="ipndm", eval_sigmas=s.eval_sigmas, model=s.model, meta=s.meta)
    plain.save(tmp_path / "plain.json")

    def sample(path, name):
        assert main(["sample", "--model", "ring-mixture", "--sampler", "ipndm", "--schedule", str(path), "--num", "8",
                     "--seed", "3", "--out", str(tmp_path / name), "--no-progress"]) == 0
        return np.load(tmp_path / name)["samples"]

    a, b, c = sample(out, "a.npz"), sample(out, "b.npz"), sample(tmp_path / "plain.json", "c.npz")
    assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-3  # replayed, deterministically, with the combination


def test_fastgen_scheduler_refuses_a_learned_json(tmp_path):
    from fastgen.samplers.fastgen_scheduler import load_schedule_json

    s = Schedule(karras(3, LO, HI), method="learned", solver="unipc", coefficients=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="coefficients"):
        load_schedule_json(s.save(tmp_path / "l.json"))
