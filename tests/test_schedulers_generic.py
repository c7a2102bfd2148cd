"""The generic scheduler contract of Diffusers' ``SchedulerCommonTest``, for both fastgen schedulers.

Each test runs for ``RestartScheduler`` and ``FastgenScheduler`` in VE (SD-style config), VP
(DDPM config) and flow (FlowMatchEuler config) state, on a dummy model, and asserts the property
Diffusers asserts of its own schedulers (the test code is ours). Options fastgen deliberately does not
take get a test of the clear error instead.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _tiny_models import vp_scheduler_config  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

from fastgen.samplers import FastgenScheduler, RestartScheduler  # noqa: E402

CLASSES = {"restart": RestartScheduler, "fastgen": FastgenScheduler}
SPACES = ("ve", "vp", "flow")
CASES = [(c, s) for c in CLASSES for s in SPACES]
N = 6


def source_config(space: str) -> dict:
    if space == "ve":
        return dict(PNDMScheduler(**vp_scheduler_config()).config)
    if space == "vp":
        return dict(DDPMScheduler(beta_schedule="linear").config)
    return dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)


def make(name: str, space: str, **kw):
    extra = {"restart_segments": [[3, 1, 0.5, 2.0]]} if name == "restart" else {"solver": "dpmpp_2m"}
    extra.update(kw)
    sched = CLASSES[name].from_config(source_config(space), **extra)
    assert sched.config.state_space == space
    return sched


def dummy_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Diffusers' dummy model idea: a smooth function of the input and the timestep."""
    return torch.tanh(sample) * (float(t) / 1000.0) + 0.1 * sample


def sample_like(batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(seed)).to(dtype)


def full_loop(sched, x: torch.Tensor, seed: int = 5, n: int = N, **kw) -> torch.Tensor:
    sched.set_timesteps(n, **kw)
    x = x * sched.init_noise_sigma.to(x.dtype)
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        out = dummy_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=g).prev_sample
    return x


# ------------------------------------------------------------------ config plumbing


@pytest.mark.parametrize("name,space", CASES)
def test_save_load_roundtrip(name, space, tmp_path):
    sched = make(name, space)
    sched.save_config(tmp_path)
    loaded = CLASSES[name].from_pretrained(tmp_path)
    def public(cfg):
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}

    assert public(loaded.config) == public(sched.config)
    x = sample_like()
    assert torch.equal(full_loop(sched, x), full_loop(loaded, x))
    again = CLASSES[name].from_config(sched.config)
    assert public(again.config) == public(sched.config)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


SOURCES = {
    "ve": [DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, DPMSolverMultistepScheduler],
    "vp": [DDPMScheduler],
    "flow": [FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler],
}


@pytest.mark.parametrize("name,space", CASES)
def test_from_config_of_other_schedulers(name, space):
    cap = _Capture()
    log = logging.getLogger("diffusers.configuration_utils")
    log.addHandler(cap)
    try:
        for src in SOURCES[space]:
            kw = {"shift": 3.0} if space == "flow" else {"beta_schedule": "scaled_linear", "beta_end": 0.012}
            cfg = src(**kw).config
            sched = CLASSES[name].from_config(cfg)
            assert sched.config.state_space == space, src.__name__
            for k, v in kw.items():
                assert sched.config[k] == v, (src.__name__, k)
            sched.set_timesteps(N)
    finally:
        log.removeHandler(cap)
    assert not [m for m in cap.messages if "ignored" in m], cap.messages


# ------------------------------------------------------------------ step, shapes, dtypes, batches


@pytest.mark.parametrize("name,space", CASES)
def test_step_shapes_and_return_forms(name, space):
    sched = make(name, space)
    sched.set_timesteps(N)
    x = sample_like(3)
    t = sched.timesteps[0]
    out = sched.step(dummy_model(x, t), t, x)
    assert out.prev_sample.shape == x.shape and out.pred_original_sample.shape == x.shape
    sched.set_timesteps(N)
    prev, x0 = sched.step(dummy_model(x, t), t, x, return_dict=False)
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)
    assert sched.step_index == 1


@pytest.mark.parametrize("name,space", CASES)
def test_determinism_and_generator(name, space):
    x = sample_like()
    a, b = full_loop(make(name, space), x, seed=5), full_loop(make(name, space), x, seed=5)
    assert torch.equal(a, b)
    c = full_loop(make(name, space), x, seed=6)
    if name == "restart":  # jump noise comes from the generator
        assert not torch.equal(a, c)
    else:
        assert torch.equal(a, c)


@pytest.mark.parametrize("name,space", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(name, space, dtype):
    x = sample_like(dtype=dtype)
    out = full_loop(make(name, space), x)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    ref = full_loop(make(name, space), x.float())
    eps = {torch.float16: 1e-2, torch.bfloat16: 8e-2, torch.float64: 1e-5}[dtype]  # input rounding only
    assert (out.double() - ref.double()).abs().max() <= eps * ref.abs().max()


@pytest.mark.parametrize("name,space", CASES)
def test_batch_sizes(name, space):
    """A deterministic solver gives each sample the same result whatever the batch size."""
    kw = {"restart_segments": None, "restart_preset": "none"} if name == "restart" else {}
    x = sample_like(4)
    whole = full_loop(make(name, space, **kw), x)
    for b in (1, 2):
        part = full_loop(make(name, space, **kw), x[:b])
        assert (part - whole[:b]).abs().max() <= 1e-6 * whole.abs().max()


# ------------------------------------------------------------------ noise, scaling, grids


@pytest.mark.parametrize("name,space", CASES)
def test_add_noise_at_training_timesteps(name, space):
    sched = make(name, space)
    x0, noise = sample_like(3), sample_like(3, seed=1)
    if space == "flow":
        ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
        idx = [100, 300, 999]  # flow t above 1000/1001 is capped at FLOW_SIGMA_MAX (documented)
        ts = ref.timesteps[idx]
        want = torch.stack([ref.sigmas[i] * noise[j] + (1 - ref.sigmas[i]) * x0[j] for j, i in enumerate(idx)])
    else:
        ddpm = DDPMScheduler(**{k: sched.config[k] for k in ("beta_start", "beta_end", "beta_schedule")})
        ts = torch.tensor([999, 500, 0])
        want = ddpm.add_noise(x0, noise, ts)  # VP state
        if space == "ve":
            abar = ddpm.alphas_cumprod[ts].reshape(-1, 1, 1, 1)
            want = want / abar.sqrt()  # VE state x0 + sigma eps
    for state in ("before", "after"):  # before and after set_timesteps: training timesteps are accepted
        got = sched.add_noise(x0, noise, ts)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), state
        sched.set_timesteps(N)


@pytest.mark.parametrize("name,space", CASES)
def test_scale_model_input(name, space):
    sched = make(name, space)
    sched.set_timesteps(N)
    x = sample_like()
    t = sched.timesteps[0]
    y = sched.scale_model_input(x, t)
    s = float(sched.sigmas[0])
    expect = x / math.sqrt(s * s + 1) if space == "ve" else x  # as Euler (VE); VP/flow: identity, as DPM/FlowMatch
    assert y.shape == x.shape and torch.allclose(y, expect, rtol=1e-6)
    sched.scale_model_input(x, t)
    assert sched.step_index == (0 if space == "ve" else None)  # never advances the counter


@pytest.mark.parametrize("name,space", CASES)
def test_attributes_before_set_timesteps(name, space):
    sched = make(name, space)
    assert sched.timesteps is not None and len(sched.timesteps) == sched.config.num_train_timesteps
    assert isinstance(sched.init_noise_sigma, torch.Tensor) and sched.init_noise_sigma.cpu().ndim == 0
    assert len(sched) == 1000
    if space != "flow":
        ddpm = DDPMScheduler(**{k: sched.config[k] for k in ("beta_start", "beta_end", "beta_schedule")})
        assert torch.equal(sched.betas, ddpm.betas)
        assert torch.allclose(sched.alphas_cumprod, ddpm.alphas_cumprod, rtol=1e-6)
    if space == "ve":
        sched.set_timesteps(N)
        euler = EulerDiscreteScheduler.from_config(source_config("ve"), use_karras_sigmas=True)
        euler.set_timesteps(N)
        if name == "fastgen":
            assert float(sched.init_noise_sigma) == pytest.approx(float(euler.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("name", CLASSES)
def test_beta_schedule_exp_as_heun(name):
    sched = CLASSES[name](beta_schedule="exp")
    heun = HeunDiscreteScheduler(beta_schedule="exp")
    assert torch.equal(sched.alphas_cumprod, heun.alphas_cumprod)
    sched.set_timesteps(N)
    assert torch.isfinite(sched.sigmas).all()


@pytest.mark.parametrize("name", CLASSES)
def test_final_sigmas_type_sigma_min(name):
    kw = {"solver": "euler"} if name == "fastgen" else {}
    sched = CLASSES[name].from_config(source_config("ve"), final_sigmas_type="sigma_min", **kw)
    sched.set_timesteps(N)
    sigma_min = float(sched._vp.sigma_min)
    assert float(sched.plan_sigmas[-1]) == sigma_min
    assert (sched.plan_sigmas[:-1] > sigma_min).all()
    x = full_loop(sched, sample_like())
    assert torch.isfinite(x).all()
    if name == "fastgen":  # N steps, N calls, ending at sigma_min
        assert len(sched.timesteps) == N
        for schedule in ("default", "loglinear"):
            s = FastgenScheduler.from_config(source_config("ve"), schedule=schedule, final_sigmas_type="sigma_min")
            s.set_timesteps(N)
            assert len(s.timesteps) == N and float(s.plan_sigmas[-1]) == pytest.approx(sigma_min)


@pytest.mark.parametrize("dynamic", [False, True])
def test_flow_default_grid_is_flowmatch_euler(dynamic):
    kw = {"use_dynamic_shifting": True} if dynamic else {"shift": 3.0}
    ref = FlowMatchEulerDiscreteScheduler(**kw)
    mu = 0.8 if dynamic else None
    ref.set_timesteps(N, mu=mu)
    sched = FastgenScheduler.from_config(ref.config, solver="euler", schedule="default")
    sched.set_timesteps(N, mu=mu)
    assert torch.allclose(sched.timesteps[1:], ref.timesteps[1:], rtol=1e-6)
    assert float(sched.timesteps[0]) == pytest.approx(1000 * 1000 / 1001)  # t = 1 capped at FLOW_SIGMA_MAX
    x = sample_like()
    sched.set_begin_index(1)
    ref.set_begin_index(1)
    for t, t_ref in zip(sched.timesteps[1:], ref.timesteps[1:]):  # Euler equals FlowMatchEuler step for step
        v = dummy_model(x, t)
        assert float(t) == pytest.approx(float(t_ref), rel=1e-6)
        x_ref = ref.step(v, t_ref, x).prev_sample
        x = sched.step(v, t, x).prev_sample
        assert (x - x_ref).abs().max() <= 1e-5 * x_ref.abs().max()


@pytest.mark.parametrize("name,space", CASES)
def test_custom_timesteps_and_sigmas(name, space):
    sched = make(name, space)
    if space == "flow":
        sig = [1.0, 0.75, 0.5, 0.25, 0.1]
        ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
        ref.set_timesteps(sigmas=sig)
        sched.set_timesteps(sigmas=sig)
        ts_main = sched.timesteps[sched.valid_begin_indices()]
        assert torch.allclose(ts_main[1:], ref.timesteps[1 : len(ts_main)], rtol=1e-5)  # t=1 is capped
        sched.set_timesteps(timesteps=[1000 * t for t in sig])
        assert sum(sched._calls.starts) == len(sig)  # one main step per given sigma
    else:
        ts = [999.0, 700.0, 400.0, 100.0]
        euler = EulerDiscreteScheduler.from_config(source_config(space))
        euler.set_timesteps(timesteps=ts)
        sched.set_timesteps(timesteps=ts)
        main = sched.valid_begin_indices()
        assert torch.allclose(sched.timesteps[main], euler.timesteps[: len(main)].float(), rtol=1e-5)
        sched.set_timesteps(sigmas=euler.sigmas)
        assert torch.allclose(sched.sigmas[main], euler.sigmas[: len(main)], rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps(N, sigmas=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="decreasing"):
        sched.set_timesteps(sigmas=[0.2, 0.5, 0.0])


@pytest.mark.parametrize("name,space", CASES)
def test_set_begin_index(name, space):
    sched = make(name, space)
    sched.set_timesteps(N)
    b = sched.valid_begin_indices()[2]
    assert b == 2 * sched.order
    sched.set_begin_index(b)
    x = sample_like()
    t = sched.timesteps[b]
    sched.step(dummy_model(x, t), t, x)
    assert sched.step_index == b + 1 and sched.begin_index == b
    sched.set_timesteps(N)  # resets the counter and the begin index
    assert sched.step_index is None and sched.begin_index is None


# ------------------------------------------------------------------ options fastgen does not take


@pytest.mark.parametrize("name", CLASSES)
def test_refused_options_are_clear_errors(name):
    cls = CLASSES[name]
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        cls(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        cls(beta_schedule="cubic")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        cls(prediction_type="noise")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        cls(final_sigmas_type="last")
    sched = cls()
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1, 2, 4, 4), torch.tensor(999.0), torch.zeros(1, 2, 4, 4))
    sched.set_timesteps(N)
    with pytest.raises(ValueError, match="integer loop index"):
        sched.step(torch.zeros(1, 2, 4, 4), 0, torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="timesteps must lie in"):
        sched.add_noise(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1000.0]))


def test_unknown_solver_is_refused_by_name():
    """A solver the scheduler cannot step is a ValueError listing the ones it can (every fastgen solver)."""
    from fastgen.samplers.fastgen_scheduler import FastgenScheduler

    assert FastgenScheduler(solver="unipc3").config.solver == "unipc3"
    with pytest.raises(ValueError, match=r"solver must be one of \['euler', 'heun', 'dpmpp_2m', 'ipndm', 'unipc', "
                                         r"'unipc3'\]"):
        FastgenScheduler(solver="nope")
