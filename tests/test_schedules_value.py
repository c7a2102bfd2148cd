"""The Schedule value: JSON round trip, terminal handling, Diffusers conversions, FastgenScheduler use."""

from __future__ import annotations

import json

import pytest
import torch

from fastgen.core.analytic import GaussianMixtureDenoiser
from fastgen.core.denoiser import vp_sigmas_from_config
from fastgen.core.schedules import karras
from fastgen.samplers.ays import ays_schedule, ays_timesteps
from fastgen.samplers.schedule import Schedule, apply_terminal, endpoint_rmse, steps_within_nfe

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def test_json_round_trip(tmp_path):
    s = Schedule(karras(4, 0.002, 80.0), method="karras", solver="heun", nfe=7, model="toy", objective=0.5,
                 meta={"note": "x"})
    path = s.save(tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert set(data) >= {"sigmas", "solver", "method", "nfe", "model", "objective", "fastgen_version"}
    back = Schedule.load(path)
    assert torch.equal(back.sigmas, s.sigmas)
    assert (back.solver, back.nfe, back.model, back.objective, back.meta) == ("heun", 7, "toy", 0.5, {"note": "x"})
    assert back.num_evals() == 7


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Schedule.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Schedule.load(bad)
    bad.write_text(json.dumps({"solver": "euler"}))
    with pytest.raises(ValueError, match="'sigmas'"):
        Schedule.load(bad)
    bad.write_text(json.dumps({"sigmas": [1.0, 2.0, 0.0]}))
    with pytest.raises(ValueError, match="strictly decreasing"):
        Schedule.load(bad)
    with pytest.raises(ValueError, match="solver must be one of"):
        Schedule(karras(3, 0.1, 10.0), solver="rk45")
    with pytest.raises(ValueError, match="terminal must be one of"):
        apply_terminal(torch.tensor([2.0, 1.0]), "drop")


def test_terminal_choices_on_published_ays():
    s = ays_schedule("sd15")
    assert s.steps == 10 and not s.ends_in_zero
    keep, app, rep = (s.solver_sigmas(t) for t in ("keep", "append", "replace"))
    assert keep.shape[0] == 11 and float(keep[-1]) == pytest.approx(0.029)
    assert app.shape[0] == 12 and float(app[-1]) == 0 and float(app[-2]) == pytest.approx(0.029)
    assert rep.shape[0] == 11 and float(rep[-1]) == 0 and float(rep[-2]) == pytest.approx(0.152)
    # Diffusers' sigmas= list: N + 1 entries with the terminal, like AysSchedules["StableDiffusionSigmas"]
    assert s.to_diffusers_sigmas() == pytest.approx(
        [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]
    )


def test_diffusers_timesteps_recover_published_sd15():
    s = ays_schedule("sd15")
    ts = s.to_diffusers_timesteps(SD_CONFIG, terminal="append")
    published = ays_timesteps("sd15")
    assert len(ts) == 11
    # the published sigmas are rounded to 3 decimals, so the recovered timesteps agree to +-2
    assert max(abs(a - b) for a, b in zip(ts, published)) <= 2
    assert len(s.to_diffusers_timesteps(SD_CONFIG)) == 10  # "replace": the implicit final step to 0
    table = vp_sigmas_from_config(SD_CONFIG)
    frac = s.to_diffusers_timesteps(SD_CONFIG, rounding=False)
    assert frac[0] == pytest.approx(999, abs=0.05)
    assert float(table[0]) < 0.03 < float(table[-1])
    with pytest.raises(ValueError, match="outside the scheduler table"):
        Schedule(karras(4, 0.002, 80.0)).to_diffusers_timesteps(SD_CONFIG)


def test_euler_scheduler_accepts_the_sigmas():
    from diffusers import EulerDiscreteScheduler

    s = ays_schedule("sdxl")
    sched = EulerDiscreteScheduler.from_config(SD_CONFIG)
    sched.set_timesteps(sigmas=s.to_diffusers_sigmas())
    assert len(sched.timesteps) == 10
    assert sched.sigmas[:-1].double() == pytest.approx(s.sigmas[:-1].double(), rel=1e-5)
    assert float(sched.sigmas[-1]) == 0


def test_flow_sigmas():
    s = Schedule(torch.tensor([9.0, 1.0, 0.25, 0.0], dtype=torch.float64))
    assert s.to_flow_sigmas() == pytest.approx([0.9, 0.5, 0.2])
    with pytest.raises(ValueError, match="flow-matching"):
        s.to_diffusers_timesteps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def test_steps_within_nfe():
    assert steps_within_nfe("heun", 7) == 4 and steps_within_nfe("heun", 6) == 3
    assert steps_within_nfe("dpmpp_2m", 6) == 6
    with pytest.raises(ValueError, match="nfe"):
        steps_within_nfe("euler", 0)


def test_eval_sigmas_wrap_and_sample():
    den = GaussianMixtureDenoiser(torch.ones(1), torch.zeros(1, 2), stds=torch.tensor([0.5]))
    sig = karras(4, 0.01, 10.0)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = Schedule(sig, solver="euler")
    same = Schedule(sig, solver="euler", eval_sigmas=sig.clone())
    moved = Schedule(sig, solver="euler", eval_sigmas=torch.cat([sig[:1], sig[1:-1] * 1.3, sig[-1:]]))
    ref = plain.sample(den, noise)
    assert torch.allclose(same.sample(den, noise), ref)
    assert not torch.allclose(moved.sample(den, noise), ref)
    assert endpoint_rmse(den, same, noise, ref) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="eval_sigmas"):
        Schedule(sig, eval_sigmas=sig[:-1])


def test_fastgen_scheduler_reads_schedule_json(tmp_path):
    fs = pytest.importorskip("fastgen.samplers.fastgen_scheduler")
    s = Schedule(karras(5, 0.03, 14.0), method="karras", solver="dpmpp_2m", nfe=5)
    path = s.save(tmp_path / "s.json")
    sig, solver = fs.load_schedule_json(path)
    assert solver == "dpmpp_2m"
    assert sig == pytest.approx(s.sigmas.tolist())


def test_dpm_multistep_accepts_the_timesteps():
    from diffusers import DPMSolverMultistepScheduler

    ts = ays_schedule("sd15").to_diffusers_timesteps(SD_CONFIG)
    sched = DPMSolverMultistepScheduler.from_config(SD_CONFIG)
    sched.set_timesteps(timesteps=ts)
    assert [int(t) for t in sched.timesteps] == ts
    assert ts[0] == 999 and len(ts) == 10
