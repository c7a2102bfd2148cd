"""RestartScheduler / FastgenScheduler inside real (tiny, random-weight) Diffusers pipelines.

Every pipeline result is compared with ``restart_sample`` / the functional solver on the adapted
denoiser (``from_diffusers``) for the same noise, and network calls are counted.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _tiny_models import (  # noqa: E402
    tiny_cond_unet,
    tiny_flux_cond,
    tiny_flux_transformer,
    tiny_sd3_cond,
    tiny_sd3_transformer,
    tiny_text_states,
    tiny_unet,
    vp_scheduler_config,
)
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fastgen.core import solvers  # noqa: E402
from fastgen.core.analytic import GaussianMixtureDenoiser  # noqa: E402
from fastgen.core.denoiser import from_diffusers  # noqa: E402
from fastgen.core.schedules import FLOW_SIGMA_MAX  # noqa: E402
from fastgen.samplers import FastgenScheduler, RestartScheduler, restart_sample  # noqa: E402

TOL = 1e-4  # max abs difference relative to the largest magnitude


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def record_last_step(sched) -> dict:
    last: dict = {}
    orig = sched.step

    @functools.wraps(orig)
    def step(*args, **kwargs):
        out = orig(*args, **kwargs)
        last["x"] = out[0]
        return out

    sched.step = step
    return last


def tiny_vae(latent_channels: int = 2) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, layers_per_block=1,
    ).eval()


@pytest.fixture(scope="module")
def cond_unet():
    return tiny_cond_unet()


@pytest.fixture(scope="module")
def sd_config():
    return PNDMScheduler(**vp_scheduler_config()).config


def run_sd(unet, sched, steps=5, guidance=1.0, batch=2):
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pe, ne = tiny_text_states(batch), tiny_text_states(batch, seed=7)
    out = pipe(
        prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=guidance, num_inference_steps=steps,
        height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="latent",
    ).images
    return out, pe, ne


# ------------------------------------------------------------------ pipelines


def test_ddpm_pipeline_restart_equals_function():
    unet = tiny_unet()
    config = DDPMScheduler(beta_schedule="linear").config
    sched = RestartScheduler.from_config(config, restart_segments=[[3, 1, 0.5, 2.0]])
    assert sched.config.state_space == "vp" and sched.init_noise_sigma == 1.0
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    calls = count_calls(unet)
    last = record_last_step(sched)
    gen = torch.Generator().manual_seed(0)
    img = pipe(batch_size=2, generator=gen, num_inference_steps=6, output_type="np").images
    plan = sched.restart_plan()
    assert img.shape == (2, 8, 8, 2) and len(calls) == plan.nfe == 2 * 6 - 1 + 2 * 1 * 2
    g = torch.Generator().manual_seed(0)
    noise = randn_tensor((2, 2, 8, 8), generator=g)
    calls.clear()
    x_start = noise * math.sqrt(1 + plan.sigmas[0].item() ** 2)
    x = restart_sample(from_diffusers(unet, config), x_start, plan=plan, generator=g)
    assert len(calls) == plan.nfe
    assert torch.isfinite(last["x"]).all()
    assert rel_err(last["x"], x) <= TOL


def test_sd_pipeline_restart_cfg_equals_function(cond_unet, sd_config):
    sched = RestartScheduler.from_config(sd_config, restart_segments=[[3, 1, 0.5, 2.0]])
    assert sched.config.state_space == "ve"
    calls = count_calls(cond_unet)
    out, pe, ne = run_sd(cond_unet, sched, steps=5, guidance=3.0)
    plan = sched.restart_plan()
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()
    assert len(calls) == plan.nfe == 2 * 5 - 1 + 4
    den = from_diffusers(cond_unet, sd_config)

    def cfg_den(x, sigma):
        d = den(torch.cat([x, x]), sigma, encoder_hidden_states=torch.cat([ne, pe]))
        u, c = d.chunk(2)
        return u + 3.0 * (c - u)

    g = torch.Generator().manual_seed(0)
    noise = randn_tensor(out.shape, generator=g)
    x = restart_sample(cfg_den, noise * sched.init_noise_sigma, plan=plan, generator=g)
    assert rel_err(out, x) <= TOL


def test_sd_fastgen_euler_karras_reproduces_diffusers_euler(cond_unet, sd_config):
    ours = FastgenScheduler.from_config(sd_config, solver="euler", schedule="karras")
    ref = EulerDiscreteScheduler.from_config(sd_config, use_karras_sigmas=True)
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    assert torch.allclose(ours.timesteps, ref.timesteps, rtol=1e-5, atol=1e-4)
    assert torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-6)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    a, *_ = run_sd(cond_unet, ours)
    b, *_ = run_sd(cond_unet, ref)
    assert rel_err(a, b) <= 1e-5


def test_sd_fastgen_heun_default_reproduces_diffusers_heun(cond_unet, sd_config):
    calls = count_calls(cond_unet)
    ours = FastgenScheduler.from_config(sd_config, solver="heun", schedule="default")
    a, *_ = run_sd(cond_unet, ours, steps=4)
    assert len(calls) == 2 * 4 - 1
    b, *_ = run_sd(cond_unet, HeunDiscreteScheduler.from_config(sd_config), steps=4)
    assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "ipndm", "unipc", "unipc3"])
def test_sd_fastgen_solvers_equal_functional(cond_unet, sd_config, solver):
    sched = FastgenScheduler.from_config(sd_config, solver=solver, schedule="karras")
    calls = count_calls(cond_unet)
    out, pe, _ = run_sd(cond_unet, sched, steps=5)
    sigmas = sched.plan_sigmas
    assert len(calls) == solvers.nfe(solver, sigmas) == len(sched.timesteps)
    g = torch.Generator().manual_seed(0)
    noise = randn_tensor(out.shape, generator=g)
    x = solvers.get_solver(solver)(from_diffusers(cond_unet, sd_config), noise * sched.init_noise_sigma,
                                   sigmas.float(), encoder_hidden_states=pe)
    assert rel_err(out, x) <= TOL


@pytest.fixture(scope="module")
def flux_setup():
    tr = tiny_flux_transformer()
    config = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config
    return tr, config


def run_flux(tr, sched, steps=6):
    seen: dict = {}

    def hook(mod, args, kwargs):
        if not seen:
            seen.update(kwargs)

    handle = tr.register_forward_pre_hook(hook, with_kwargs=True)
    pipe = FluxPipeline(
        scheduler=sched, vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=tr,
    )
    pipe.set_progress_bar_config(disable=True)
    c = tiny_flux_cond(1)
    out = pipe(prompt_embeds=c["encoder_hidden_states"], pooled_prompt_embeds=c["pooled_projections"],
               num_inference_steps=steps, height=16, width=16, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    handle.remove()
    return out, seen


def flux_reference(tr, seen):
    """The adapted float64 denoiser and the initial latent the pipeline used."""
    import copy

    tr64 = copy.deepcopy(tr).double()
    den = from_diffusers(tr64, {"_class_name": "FlowMatchEulerDiscreteScheduler"})
    assert den.timestep_scale == 1.0  # Flux transformers take t in [0, 1]
    keys = ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")
    cond = {k: seen[k].double() for k in keys}
    return den, seen["hidden_states"].double(), cond


def test_flux_pipeline_restart_equals_function(flux_setup):
    tr, config = flux_setup
    sched = RestartScheduler.from_config(config, restart_segments=[[3, 1, 0.5, 2.0]])
    assert sched.config.state_space == "flow"
    sched.set_generator(torch.Generator().manual_seed(9))  # Flux does not pass a generator to step()
    calls = count_calls(tr)
    out, seen = run_flux(tr, sched)
    plan = sched.restart_plan()
    assert out.shape == (1, 16, 8) and torch.isfinite(out).all()
    assert len(calls) == plan.nfe == 2 * 6 - 1 + 4
    assert plan.sigmas[0].item() == pytest.approx(FLOW_SIGMA_MAX)  # flow t = 1 is capped
    den, x_fm, cond = flux_reference(tr, seen)
    x = restart_sample(den, x_fm * (1 + plan.sigmas[0].item()), plan=plan,
                       generator=torch.Generator().manual_seed(9), **cond)
    assert rel_err(out, x) <= TOL


@pytest.mark.parametrize("solver", ["heun", "unipc", "unipc3"])
def test_flux_pipeline_fastgen_solver_equals_function(flux_setup, solver):
    """Flow state space (VE arithmetic in float64): the scheduler's steps are the functional solver's."""
    tr, config = flux_setup
    sched = FastgenScheduler.from_config(config, solver=solver)
    out, seen = run_flux(tr, sched, steps=4)
    sigmas = sched.plan_sigmas
    den, x_fm, cond = flux_reference(tr, seen)
    x = solvers.get_solver(solver)(den, x_fm * (1 + sigmas[0].item()), sigmas, **cond)
    assert rel_err(out, x) <= TOL


def test_sd3_pipeline_restart_equals_function():
    import copy

    tr = tiny_sd3_transformer()
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    sched = RestartScheduler.from_config(config, restart_segments=[[3, 1, 1.0, 4.0]])
    sched.set_generator(torch.Generator().manual_seed(9))
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=sched, vae=tiny_vae(4), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    seen: dict = {}
    tr.register_forward_pre_hook(lambda m, a, k: seen.update(k) if not seen else None, with_kwargs=True)
    calls = count_calls(tr)
    c = tiny_sd3_cond(1)
    out = pipe(prompt_embeds=c["encoder_hidden_states"], pooled_prompt_embeds=c["pooled_projections"],
               guidance_scale=1.0, num_inference_steps=5, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="latent").images
    plan = sched.restart_plan()
    assert out.shape == (1, 4, 8, 8) and len(calls) == plan.nfe == 2 * 5 - 1 + 4
    den = from_diffusers(copy.deepcopy(tr).double(), config)
    assert den.timestep_scale == 1000.0  # SD3 transformers take t * 1000
    cond = {k: seen[k].double() for k in ("encoder_hidden_states", "pooled_projections")}
    x = restart_sample(den, seen["hidden_states"].double() * (1 + plan.sigmas[0].item()), plan=plan,
                       generator=torch.Generator().manual_seed(9), **cond)
    assert rel_err(out, x) <= TOL


# ------------------------------------------------------------------ exact step logic (float64)


def _mixture():
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64)
    return GaussianMixtureDenoiser(torch.tensor([0.5, 0.5]), means, stds=torch.tensor([0.2, 0.3]))


def manual_loop(sched, den, noise, generator=None):
    """The standard pipeline loop with an exact epsilon model; logs the VE sigma of every call."""
    x = noise * sched.init_noise_sigma
    seen = []
    for i, t in enumerate(sched.timesteps):
        sigma = sched._calls.sigmas[i]
        seen.append(sigma)
        x_in = sched.scale_model_input(x, t)
        x_ve = x_in * math.sqrt(1 + sigma**2)
        eps = (x_ve - den(x_ve, sigma)) / sigma
        x = sched.step(eps, t, x, generator=generator).prev_sample
    return x, seen


@pytest.mark.parametrize("solver", list(solvers.SOLVERS))  # every fastgen solver steps in the scheduler
@pytest.mark.parametrize("space", ["ve", "vp"])
def test_scheduler_steps_equal_core_solvers_float64(solver, space):
    den = _mixture()
    sched = FastgenScheduler(solver=solver, schedule="karras", state_space=space)
    sched.set_timesteps(7)
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, seen = manual_loop(sched, den, noise)
    sig = sched.plan_sigmas
    start = noise * (sched.init_noise_sigma if space == "ve" else math.sqrt(1 + sig[0].item() ** 2))
    ref = solvers.get_solver(solver)(den, start, sig)
    assert torch.allclose(x, ref, atol=1e-10, rtol=0)
    if solver == "heun":  # duplicated timesteps: the corrector is evaluated at the next sigma
        assert seen[1] == seen[2] == sig[1].item()


@pytest.mark.parametrize("space", ["ve", "vp"])
def test_restart_scheduler_equals_restart_sample_float64(space):
    den = _mixture()
    sched = RestartScheduler(restart_segments=[[4, 2, 0.3, 3.0], [3, 1, 1.0, 8.0]], s_noise=1.003,
                             restart_churn=0.05, state_space=space)
    sched.set_timesteps(8)
    plan = sched.restart_plan()
    assert len(sched.timesteps) == plan.nfe == 2 * 8 - 1 + 2 * 2 * 3 + 2 * 1 * 2
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, seen = manual_loop(sched, den, noise, torch.Generator().manual_seed(3))
    s0 = plan.sigmas[0].item()
    start = noise * (sched.init_noise_sigma if space == "ve" else math.sqrt(1 + s0**2))
    ref = restart_sample(den, start, plan=plan, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x, ref, atol=1e-10, rtol=0)


# ------------------------------------------------------------------ config plumbing


CONFIG_SOURCES = [DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                  DPMSolverMultistepScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler]


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.mark.parametrize("source", CONFIG_SOURCES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", [RestartScheduler, FastgenScheduler])
def test_from_config_of_diffusers_schedulers_is_quiet(cls, source):
    cap = _Capture()
    logger = logging.getLogger("diffusers")
    logger.addHandler(cap)
    try:
        config = dict(source().config)
        config["_class_name"] = source.__name__  # as loaded from a saved scheduler_config.json
        sched = cls.from_config(config)
    finally:
        logger.removeHandler(cap)
    assert cap.records == []
    expected = {"DDPMScheduler": "vp", "FlowMatchEulerDiscreteScheduler": "flow"}.get(source.__name__, "ve")
    assert sched.config.state_space == expected
    sched.set_timesteps(6, mu=0.5 if source is FlowMatchEulerDiscreteScheduler else None)
    assert torch.isfinite(sched.timesteps).all() and len(sched) == 1000


def test_save_load_roundtrip(tmp_path):
    segs = [[3, 2, 0.2, 1.0]]
    sched = RestartScheduler.from_config(vp_scheduler_config(), restart_segments=segs, s_noise=1.003)
    sched.save_pretrained(tmp_path / "r")
    back = RestartScheduler.from_pretrained(tmp_path / "r")
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(sched.config)
    sched.set_timesteps(9)
    back.set_timesteps(9)
    assert torch.equal(sched.timesteps, back.timesteps)
    sigmas = [14.0, 5.0, 1.0, 0.3, 0.05, 0.0]
    path = tmp_path / "sched.json"
    path.write_text(json.dumps({"sigmas": sigmas, "solver": "dpmpp_2m", "method": "ld3"}))
    f = FastgenScheduler.from_config(vp_scheduler_config(), schedule=str(path))
    assert f.config.solver == "dpmpp_2m" and f.config.schedule == sigmas
    f.save_pretrained(tmp_path / "f")
    g = FastgenScheduler.from_pretrained(tmp_path / "f")
    f.set_timesteps(5)
    g.set_timesteps(5)
    assert torch.equal(f.sigmas, g.sigmas) and f.sigmas[:-1].tolist() == pytest.approx(sigmas[:-1], rel=1e-6)
    g.set_timesteps(3)  # another step count: resampled log-linearly, endpoints kept
    assert len(g.timesteps) == 3 and g.sigmas[0].item() == pytest.approx(14.0)


def test_schedule_json_validation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sigmas": [1.0, 2.0, 0.0]}))
    with pytest.raises(ValueError, match="decreasing"):
        FastgenScheduler(schedule=str(bad))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"sigmas": [10.0, 1.0, 0.0], "solver": "heun"}))
    with pytest.raises(ValueError, match="heun"):
        FastgenScheduler(schedule=str(good), solver="euler")
    (tmp_path / "nosig.json").write_text("{}")
    with pytest.raises(ValueError, match="sigmas"):
        FastgenScheduler(schedule=str(tmp_path / "nosig.json"))
    with pytest.raises(ValueError, match="schedule"):
        FastgenScheduler(schedule="nonexistent-name")
    with pytest.raises(ValueError, match="solver"):
        FastgenScheduler(solver="rk45")


def test_retrieve_timesteps_accepts_custom_schedules():
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    sched = FastgenScheduler.from_config(vp_scheduler_config(), solver="heun")
    ts, n = retrieve_timesteps(sched, sigmas=[10.0, 3.0, 1.0, 0.0])
    assert n == len(ts) == 5 and sched.sigmas.tolist() == pytest.approx([10, 3, 3, 1, 1, 0])
    ts, n = retrieve_timesteps(sched, timesteps=[999.0, 500.0, 100.0])
    assert n == 5 and ts[0].item() == pytest.approx(999.0)
    flow = RestartScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    ts, n = retrieve_timesteps(flow, sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.8)
    # N flow sigmas get a 0 appended and are shifted with mu (FlowMatch convention)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25]).double()
    shifted = math.exp(0.8) / (math.exp(0.8) + (1 / t - 1))
    assert flow.restart_plan().sigmas[1:-1].tolist() == pytest.approx((shifted / (1 - shifted))[1:].tolist())
    noshift = RestartScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                                           shift_custom_sigmas=False)
    noshift.set_timesteps(sigmas=[1.0, 0.5])
    assert noshift.restart_plan().sigmas.tolist() == pytest.approx([FLOW_SIGMA_MAX, 1.0, 0.0])
    with pytest.raises(ValueError, match="mu"):
        flow.set_timesteps(4)


def test_return_forms_dtype_and_guards():
    sched = RestartScheduler.from_config(vp_scheduler_config())
    sched.set_timesteps(4)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    t = sched.timesteps[0]
    out = sched.step(torch.zeros_like(x), t, x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2
    prev, x0 = out
    assert prev.dtype == torch.float16 and x0.dtype == torch.float16
    assert sched.step_index == 1
    with pytest.raises(ValueError, match="integer"):
        sched.step(torch.zeros_like(x), 1, x)
    with pytest.raises(ValueError, match="integer"):
        sched.step(torch.zeros_like(x), torch.tensor(3), x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="decreasing"):
        sched.set_timesteps(sigmas=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps(4, sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="t_min < t_max"):
        RestartScheduler(restart_segments=[[3, 1, 2.0, 1.0]])
    with pytest.raises(ValueError, match="k"):
        RestartScheduler(restart_segments=[[3, -1, 0.5, 1.0]])
    bad = RestartScheduler(restart_segments=[[3, 1, 0.5, 1e4]])
    with pytest.raises(ValueError, match="outside"):
        bad.set_timesteps(5)
    sched.set_timesteps(2)
    for t in sched.timesteps:
        sched.step(torch.zeros_like(x), t, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x)


def test_begin_index_img2img_rules():
    sched = RestartScheduler.from_config(vp_scheduler_config(), restart_segments=[[3, 1, 0.5, 2.0]])
    sched.set_timesteps(6)
    assert sched.order == 2
    # main step k begins at call 2k until the segment (calls 6-9, after main step 2 lands on t_min);
    # later main steps (calls 10, 12, 14) are not valid img2img starts: timesteps[2k:] would not be step k
    assert sched.valid_begin_indices() == [0, 2, 4]
    with pytest.raises(ValueError, match="inside a Heun step, a restart segment or after one"):
        sched.set_begin_index(1)
    with pytest.raises(ValueError, match="valid begin indices"):
        sched.set_begin_index(7)
    # img2img slicing: t_start = N - int(N * strength) main steps, begin index t_start * order
    outcomes = {}
    for strength in (0.2, 0.5, 0.8):
        t_start = 6 - int(6 * strength)
        try:
            sched.set_begin_index(t_start * sched.order)
            outcomes[t_start] = "ok"
        except ValueError as err:
            assert "valid begin indices" in str(err)
            outcomes[t_start] = "refused"
    assert outcomes == {5: "refused", 3: "refused", 2: "ok"}
    sched.set_begin_index(4)
    x0 = torch.zeros(1, 2, 4, 4)
    noise = torch.ones_like(x0)
    noised = sched.add_noise(x0, noise, sched.timesteps[4:5])
    sigma = sched._calls.sigmas[4]
    assert torch.allclose(noised, torch.full_like(x0, sigma), rtol=1e-6)  # VE state x0 + sigma * noise
    x0 = torch.zeros(1, 2, 4, 4)
    noise = torch.ones_like(x0)
    vp = RestartScheduler.from_config(DDPMScheduler().config, restart_segments=[[3, 1, 0.5, 2.0]])
    vp.set_timesteps(6)
    b = vp.valid_begin_indices()[-2]
    vp.set_begin_index(b)
    out = vp.add_noise(x0, noise, vp.timesteps[b : b + 1])
    s = vp._calls.sigmas[b]
    assert torch.allclose(out, torch.full_like(x0, s / math.sqrt(1 + s * s)), rtol=1e-6)


def test_get_velocity_matches_ddpm():
    ddpm = DDPMScheduler()
    ours = RestartScheduler.from_config(ddpm.config)
    x, n = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(ours.get_velocity(x, n, t), ddpm.get_velocity(x, n, t), atol=1e-5)


def test_presets_and_auto_rule_in_scheduler(sd_config):
    from fastgen.samplers.restart import get_preset

    sd15 = RestartScheduler.from_config(sd_config, restart_preset="sd15-w5")
    sd15.set_timesteps(30)
    assert len(sd15.timesteps) == get_preset("sd15-w5").nfe == 2 * 30 - 1 + 2 * 2 * 9
    auto = RestartScheduler.from_config(sd_config)
    for steps in (19, 20, 36):  # A1111: total solver steps == request, so calls == 2 * steps - 1
        auto.set_timesteps(steps)
        assert len(auto.timesteps) == 2 * steps - 1
        assert bool(auto.restart_plan().jumps.any()) == (steps >= 20)
    plain = RestartScheduler.from_config(sd_config, restart_preset="none")
    plain.set_timesteps(7)
    heun = FastgenScheduler.from_config(sd_config, solver="heun", schedule="karras")
    heun.set_timesteps(7)
    assert torch.equal(plain.timesteps, heun.timesteps)
    loglin = FastgenScheduler.from_config(sd_config, schedule="loglinear")
    loglin.set_timesteps(4)
    s = loglin.plan_sigmas[:-1].log()
    assert torch.allclose(s[1:] - s[:-1], (s[1] - s[0]).expand(3), atol=1e-9)  # log-uniform


def test_knots_schedule_terminal_conventions():
    knots = [14.6, 3.0, 0.8, 0.1, 0.03]  # AYS-style list ending at a positive sigma
    rep = FastgenScheduler(schedule=knots)
    rep.set_timesteps(4)
    assert rep.plan_sigmas.tolist() == pytest.approx([14.6, 3.0, 0.8, 0.1, 0.0])
    app = FastgenScheduler(schedule=knots, terminal="append")
    app.set_timesteps(5)
    assert app.plan_sigmas.tolist() == pytest.approx(knots + [0.0])
    app.set_timesteps(3)
    assert len(app.plan_sigmas) == 4 and app.plan_sigmas[-1] == 0 and app.plan_sigmas[-2] == pytest.approx(0.03)
    keep = FastgenScheduler(schedule=knots, terminal="keep")
    keep.set_timesteps(4)
    assert keep.plan_sigmas.tolist() == pytest.approx(knots)
    with pytest.raises(ValueError, match="terminal"):
        FastgenScheduler(schedule=knots, terminal="drop")


def test_schedule_outside_the_model_range_is_refused(sd_config, tmp_path):
    """A schedule made for another range (EDM's 80 -> 0.002) is refused inside an SD config (table 0.029..14.6)
    with both ranges named; the override runs it; an in-range schedule (JSON too) is accepted. The scheduler's
    range is the same one load_model records for a pipeline (one home: fastgen.core.ranges)."""
    from fastgen.core.ranges import scheduler_sigma_range
    from fastgen.core.schedules import FLOW_SIGMA_MAX, karras

    lo, hi = FastgenScheduler.from_config(sd_config).model_sigma_range()
    acp = DDPMScheduler.from_config(sd_config).alphas_cumprod.double()
    assert lo == pytest.approx(float(((1 - acp[0]) / acp[0]).sqrt()), rel=1e-6)
    assert hi == pytest.approx(float(((1 - acp[-1]) / acp[-1]).sqrt()), rel=1e-6)
    assert (lo, hi) == scheduler_sigma_range(sd_config)
    edm = karras(6, 0.002, 80.0).tolist()
    refused = r"\[0\.002, 80\].*model's sigma range \[0\.0291.*, 14\.6.*allow_schedule_range"
    with pytest.raises(ValueError, match=refused):
        FastgenScheduler.from_config(sd_config, solver="euler", schedule=edm)
    FastgenScheduler.from_config(sd_config, solver="euler", schedule=edm, allow_schedule_range=True)
    inside = karras(6, lo, hi).tolist()
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"sigmas": inside, "solver": "euler"}))
    assert FastgenScheduler.from_config(sd_config, schedule=str(path)).config.schedule == inside
    # Flow: the shifted grid's range; dynamic shifting admits any shift in [base_shift, max_shift].
    flow_cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    f_lo, f_hi = FastgenScheduler.from_config(flow_cfg).model_sigma_range()
    assert (f_lo, f_hi) == scheduler_sigma_range(flow_cfg)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(1000)  # Diffusers' own grid at num_train_timesteps steps (its smallest t is shifted twice)
    t_lo = float(ref.sigmas[ref.sigmas > 0].min())
    assert f_lo == pytest.approx(t_lo / (1 - t_lo), rel=1e-6)
    assert f_hi == FLOW_SIGMA_MAX  # t = 1 (pure noise), VE-capped
    with pytest.raises(ValueError, match="does not fit"):
        FastgenScheduler.from_config(flow_cfg, schedule=karras(4, f_lo / 2, 100.0).tolist())
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15).config
    d_lo, d_hi = FastgenScheduler.from_config(dyn).model_sigma_range()
    assert d_hi == pytest.approx(scheduler_sigma_range(dyn, mu=1.15)[1], rel=1e-12)
    assert d_lo == pytest.approx(scheduler_sigma_range(dyn, mu=0.5)[0], rel=1e-12)
