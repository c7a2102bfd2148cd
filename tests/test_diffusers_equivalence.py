"""fastgen's solvers through the Diffusers adapters reproduce Diffusers' own schedulers.

Each test builds a tiny random-weight model from a config (``_tiny_models``), runs the Diffusers
scheduler in the standard pipeline loop (``init_noise_sigma``, ``scale_model_input``, model,
``step``) and runs the fastgen solver on the same sigmas from the same starting latents, converting
VP-state (DPM-Solver) and flow-state latents to fastgen's VE state. Tolerance: max abs difference
<= 1e-4 of the output's largest magnitude, float32 (measured: 1e-7 .. 1.5e-5).

Documented differences (tested as such, not hidden):

- ``FlowMatchEulerDiscreteScheduler`` starting at flow time t = 1: VE sigma is infinite there and
  fastgen caps it at ``FLOW_SIGMA_MAX`` = 1000 (t = 1000/1001), so the first step differs by
  O(1e-3). fastgen matches Diffusers exactly when Diffusers starts at that capped t, or at any t < 1.
- ``DPMSolverMultistepScheduler`` with ``use_karras_sigmas`` (or exponential/Lu sigmas) rounds the
  model's timestep to an integer but keeps the unrounded sigma in its update; fastgen's adapter
  gives the model the fractional timestep that belongs to the sigma. They agree exactly on integer
  timestep schedules (the default spacing), and on Karras sigmas once the model's timestep is rounded.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_models import (
    flow_scheduler_config,
    tiny_cond_unet,
    tiny_flux_cond,
    tiny_flux_transformer,
    tiny_sd3_cond,
    tiny_sd3_transformer,
    tiny_text_states,
    tiny_unet,
    vp_scheduler_config,
)

from fastgen.core import solvers
from fastgen.core.denoiser import (
    DiffusersFlowDenoiser,
    DiffusersVPDenoiser,
    from_diffusers,
    vp_sigmas_from_config,
)
from fastgen.core.schedules import FLOW_SIGMA_MAX, flow_t_to_sigma, flow_to_ve, karras, vp_to_ve

RTOL = 1e-4


def _rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def _noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0)


def _run_ve_loop(sched, model, latents, **cond):
    """Euler/Heun-style loop: VE latents, scale_model_input divides by sqrt(sigma^2 + 1)."""
    calls = 0
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(latents, t)
            out = model(inp, t, **cond).sample
            calls += 1
            latents = sched.step(out, t, latents).prev_sample
    return latents, calls


# ------------------------------------------------------------------------------------------------
# Euler (VP models)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_euler_matches_euler_discrete_scheduler(unet, prediction_type, beta_schedule) -> None:
    from diffusers import EulerDiscreteScheduler

    cfg = vp_scheduler_config(beta_schedule, prediction_type)
    table = vp_sigmas_from_config(cfg)
    # a fastgen schedule handed to Diffusers through sigmas=
    sigmas = karras(6, float(table[0]), float(table[-1]))
    sched = EulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(sigmas=sigmas.numpy())
    latents = _noise(2, 2, 8, 8) * sched.init_noise_sigma
    theirs, _ = _run_ve_loop(sched, unet, latents)
    den = from_diffusers(unet, sched.config)
    assert isinstance(den, DiffusersVPDenoiser) and den.prediction_type == prediction_type
    with torch.no_grad():
        ours = solvers.euler(den, latents, sched.sigmas)
    assert ours.dtype == torch.float32
    assert _rel_diff(ours, theirs) <= RTOL


def test_euler_default_table_and_conditional_unet() -> None:
    """Diffusers' own N-step table (``diffusers_table``) and a cross-attention UNet with cond keywords."""
    from diffusers import EulerDiscreteScheduler

    from fastgen.core.schedules import diffusers_table

    model = tiny_cond_unet(seed=3)
    cfg = vp_scheduler_config("scaled_linear", "epsilon", timestep_spacing="leading")
    sched = EulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(5)
    sigmas = diffusers_table(cfg, 5)
    torch.testing.assert_close(sigmas.float(), sched.sigmas)
    text = tiny_text_states(2)
    latents = _noise(2, 2, 8, 8, seed=1) * sched.init_noise_sigma
    theirs, _ = _run_ve_loop(sched, model, latents, encoder_hidden_states=text)
    with torch.no_grad():
        ours = solvers.euler(from_diffusers(model, cfg), latents, sigmas, encoder_hidden_states=text)
    assert _rel_diff(ours, theirs) <= RTOL


def test_vp_sigma_to_t_matches_diffusers_interpolation() -> None:
    from diffusers import EulerDiscreteScheduler

    cfg = vp_scheduler_config("linear")
    den = DiffusersVPDenoiser(torch.nn.Identity(), cfg)
    sched = EulerDiscreteScheduler.from_config(cfg)
    log_sigmas = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt().log().numpy()
    # inside the table, on its knots, and outside it (both clamp to [0, 999])
    sig = torch.cat([torch.logspace(-2.2, 2.2, 41, dtype=torch.float64), den.table_sigmas[[0, 500, 999]]])
    ours = den.sigma_to_t(sig)
    theirs = torch.from_numpy(sched._sigma_to_t(sig.numpy(), log_sigmas)).double()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
    assert float(ours[0]) == 0.0 and float(ours[40]) == 999.0
    knots = torch.tensor([0.0, 500.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(ours[-3:], knots, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Heun
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_heun_matches_heun_discrete_scheduler(unet, prediction_type) -> None:
    from diffusers import HeunDiscreteScheduler

    cfg = vp_scheduler_config("scaled_linear", prediction_type)
    sched = HeunDiscreteScheduler.from_config(cfg, use_karras_sigmas=True)
    sched.set_timesteps(5)
    # Heun duplicates every interior sigma; fastgen runs on the unique ones
    sigmas = torch.unique_consecutive(sched.sigmas)
    assert len(sigmas) == 6 and float(sigmas[-1]) == 0
    latents = _noise(2, 2, 8, 8, seed=2) * sched.init_noise_sigma
    theirs, calls = _run_ve_loop(sched, unet, latents)
    assert calls == solvers.nfe("heun", sigmas) == 9  # 2N - 1
    with torch.no_grad():
        ours = solvers.heun(from_diffusers(unet, cfg), latents, sigmas)
    assert _rel_diff(ours, theirs) <= RTOL


# ------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (a VP-state scheduler)
# ------------------------------------------------------------------------------------------------


def _run_dpm(sched, model, noise):
    latents = noise * sched.init_noise_sigma  # VP state (init_noise_sigma = 1)
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(sched.scale_model_input(latents, t), t).sample
            latents = sched.step(out, t, latents).prev_sample
    return noise * sched.init_noise_sigma, latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_dpm_solver_multistep(unet, prediction_type) -> None:
    from diffusers import DPMSolverMultistepScheduler

    cfg = vp_scheduler_config("scaled_linear", prediction_type)
    sched = DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", lower_order_final=True
    )
    sched.set_timesteps(6)
    start_vp, theirs = _run_dpm(sched, unet, _noise(2, 2, 8, 8, seed=3))
    sigmas = sched.sigmas
    x = vp_to_ve(start_vp, sigmas[0])  # VP -> VE; at sigma = 0 the two states coincide
    with torch.no_grad():
        ours = solvers.dpmpp_2m(from_diffusers(unet, cfg), x, sigmas)
    assert _rel_diff(ours, theirs) <= RTOL


def test_dpmpp_2m_karras_sigmas_with_rounded_model_time(unet) -> None:
    """Karras sigmas: Diffusers feeds the model round(t(sigma)); with that rounding, the solvers agree."""
    from diffusers import DPMSolverMultistepScheduler

    cfg = vp_scheduler_config("scaled_linear", "epsilon")
    sched = DPMSolverMultistepScheduler.from_config(
        cfg,
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    sched.set_timesteps(6)
    start_vp, theirs = _run_dpm(sched, unet, _noise(2, 2, 8, 8, seed=4))
    x = vp_to_ve(start_vp, sched.sigmas[0])

    def rounded(x_in, timestep, **kw):
        return unet(x_in, timestep.round(), **kw)

    with torch.no_grad():
        ours = solvers.dpmpp_2m(DiffusersVPDenoiser(rounded, cfg), x, sched.sigmas)
        fractional = solvers.dpmpp_2m(DiffusersVPDenoiser(unet, cfg), x, sched.sigmas)
    assert _rel_diff(ours, theirs) <= RTOL
    # the documented difference: the model-time rounding alone moves the result measurably
    assert _rel_diff(fractional, theirs) > 10 * RTOL


# ------------------------------------------------------------------------------------------------
# Flow matching (SD3 / Flux transformers)
# ------------------------------------------------------------------------------------------------


def _run_flow(sched, model, noise, timestep_scale, **cond):
    latents = noise.clone()
    b = noise.shape[0]
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(latents, timestep=(t / 1000 * timestep_scale).expand(b), **cond).sample
            latents = sched.step(out, t, latents).prev_sample
    return latents


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_transformer(seed=0)


def test_flow_euler_matches_flow_match_euler_scheduler(sd3) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = flow_scheduler_config(shift=3.0)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(sigmas=torch.linspace(0.95, 0.1, 6).numpy())  # shifted by Diffusers
    t = sched.sigmas
    assert float(t[0]) < 1 and float(t[-1]) == 0
    cond = tiny_sd3_cond(2)
    noise = _noise(2, 4, 8, 8, seed=5)
    theirs = _run_flow(sched, sd3, noise, 1000.0, **cond)
    den = from_diffusers(sd3, sched.config)
    assert isinstance(den, DiffusersFlowDenoiser) and den.timestep_scale == 1000.0
    with torch.no_grad():
        ours = solvers.euler(den, flow_to_ve(noise, t[0]), flow_t_to_sigma(t), **cond)
    assert _rel_diff(ours, theirs) <= RTOL


def test_flow_euler_from_pure_noise_is_capped(sd3) -> None:
    """t = 1 maps to VE sigma FLOW_SIGMA_MAX: exact against Diffusers started at t = 1000/1001."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = flow_scheduler_config(shift=1.0)
    cond = tiny_sd3_cond(2)
    noise = _noise(2, 4, 8, 8, seed=6)
    rest = [0.75, 0.5, 0.25]
    t_cap = FLOW_SIGMA_MAX / (1 + FLOW_SIGMA_MAX)
    runs = {}
    for name, t0 in (("one", 1.0), ("cap", t_cap)):
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        sched.set_timesteps(sigmas=[t0, *rest])
        runs[name] = _run_flow(sched, sd3, noise, 1000.0, **cond)
    sigmas = flow_t_to_sigma(torch.tensor([1.0, *rest, 0.0], dtype=torch.float64))
    assert float(sigmas[0]) == FLOW_SIGMA_MAX
    with torch.no_grad():
        ours = solvers.euler(from_diffusers(sd3, cfg), flow_to_ve(noise, t_cap), sigmas, **cond)
    assert _rel_diff(ours, runs["cap"]) <= RTOL
    assert 10 * RTOL < _rel_diff(ours, runs["one"]) < 0.05  # measured 0.0138


def test_flux_transformer_with_dynamic_shift() -> None:
    """A Flux-style transformer (timestep in [0, 1]) through ``from_diffusers`` and a ``mu`` shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_flux_transformer(seed=1)
    cfg = flow_scheduler_config(shift=1.0, use_dynamic_shifting=True)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(sigmas=torch.linspace(0.9, 0.15, 5).numpy(), mu=0.8)
    cond = tiny_flux_cond(2)
    noise = _noise(2, 16, 8, seed=7)
    theirs = _run_flow(sched, model, noise, 1.0, **cond)
    den = from_diffusers(model, sched.config)
    assert den.timestep_scale == 1.0
    with torch.no_grad():
        ours = solvers.euler(den, flow_to_ve(noise, sched.sigmas[0]), flow_t_to_sigma(sched.sigmas), **cond)
    assert _rel_diff(ours, theirs) <= RTOL


# ------------------------------------------------------------------------------------------------
# Adapter construction and bad input
# ------------------------------------------------------------------------------------------------


def test_from_pipeline_objects(unet, sd3) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**vp_scheduler_config("linear", "v_prediction")))
    den = from_diffusers(pipe)
    assert isinstance(den, DiffusersVPDenoiser) and den.model is unet
    assert den.prediction_type == "v_prediction"
    x = _noise(2, 2, 8, 8) * 3.0
    with torch.no_grad():
        expected = DiffusersVPDenoiser(unet, pipe.scheduler.config)(x, 3.0)
        torch.testing.assert_close(den(x, 3.0), expected, rtol=0, atol=0)

    class FlowPipe:  # any object with .transformer and .scheduler is accepted
        transformer = sd3
        scheduler = type("S", (), {"config": flow_scheduler_config()})()

    assert isinstance(from_diffusers(FlowPipe()), DiffusersFlowDenoiser)
    with pytest.raises(ValueError, match="scheduler_config is required"):
        from_diffusers(unet)
    with pytest.raises(ValueError, match="neither .unet nor .transformer"):
        from_diffusers(type("P", (), {"scheduler": pipe.scheduler})())


def test_unknown_prediction_type_is_rejected(unet) -> None:
    accepted = r"prediction_type must be one of \('epsilon', 'v_prediction', 'sample'\)"
    with pytest.raises(ValueError, match=accepted):
        DiffusersVPDenoiser(unet, vp_scheduler_config(), prediction_type="x0")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        from_diffusers(unet, vp_scheduler_config(prediction_type="flow"))


def test_vp_adapter_rejects_wrong_sigma_shape(unet) -> None:
    den = from_diffusers(unet, vp_scheduler_config())
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(2,\)"):
        den(_noise(2, 2, 8, 8), torch.ones(3))


@pytest.mark.parametrize("zero_snr", [False, True])
def test_training_table_matches_euler_scheduler(zero_snr) -> None:
    """The adapter's sigma table is Euler's (zero terminal SNR: alpha_bar[-1] = 2**-24, as Diffusers does)."""
    from diffusers import EulerDiscreteScheduler

    cfg = vp_scheduler_config("scaled_linear", rescale_betas_zero_snr=zero_snr)
    table = vp_sigmas_from_config(cfg)
    euler = EulerDiscreteScheduler.from_config(cfg)
    assert torch.isfinite(table).all() and bool((table.diff() > 0).all())
    torch.testing.assert_close(table.float(), euler.sigmas[:-1].flip(0), rtol=1e-6, atol=0)
    if zero_snr:
        assert float(table[-1]) == pytest.approx(2.0**12, rel=1e-6)  # sqrt((1 - 2^-24) / 2^-24)
