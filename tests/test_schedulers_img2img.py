"""img2img ``strength`` with fastgen schedulers equals Diffusers' Heun (start sigma, call count, progress).

Tiny random-weight SD img2img and SD3 img2img pipelines, offline. For Heun, Restart and DPM-Solver++
at strength 0.2 / 0.5 / 0.8: the first call's sigma equals ``HeunDiscreteScheduler`` /
``FlowMatchHeunDiscreteScheduler`` at the same strength, the number of network calls equals theirs
(Restart: plus its segment calls below the start sigma; DPM-Solver++: one call per step), and the output
equals the functional solver started from the pipeline's initial state at that sigma. Seeded Restart
runs in Flux and SD3 pipelines (which pass no generator to ``step``) are reproducible.
"""

from __future__ import annotations

import copy
import functools
import sys
from contextlib import contextmanager
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
    vp_scheduler_config,
)
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
)

from fastgen.core import solvers  # noqa: E402
from fastgen.core.denoiser import from_diffusers  # noqa: E402
from fastgen.samplers import FastgenScheduler, RestartScheduler, restart_sample  # noqa: E402
from fastgen.samplers._scheduler_plan import seed_from_sample  # noqa: E402
from fastgen.samplers.restart import RestartPlan  # noqa: E402

TOL = 1e-4  # max abs difference relative to the largest magnitude (float32 network vs float64 reference)
N = 10
STRENGTHS = (0.2, 0.5, 0.8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, layers_per_block=1, shift_factor=0.0,
    ).eval()


class Probe:
    """Counts network calls, progress-bar updates, and records the first step's state and generator."""

    def __init__(self, net: torch.nn.Module, sched) -> None:
        self.calls = 0
        self.updates = 0
        self.first: dict = {}
        self._h = net.register_forward_hook(self._count)
        orig = sched.step

        @functools.wraps(orig)  # keeps step's signature: pipelines pass generator= only if it is named
        def step(model_output, timestep, sample, *args, **kwargs):
            if not self.first:
                g = kwargs.get("generator")
                self.first = {"x": sample.detach().clone(), "t": float(timestep),
                              "gen": g.get_state() if g is not None else None}
            return orig(model_output, timestep, sample, *args, **kwargs)

        sched.step = step

    def _count(self, *_):
        self.calls += 1

    @contextmanager
    def progress_bar(self, total=None, **_):
        probe = self

        class Bar:
            def update(self, n=1):
                probe.updates += n

        yield Bar()

    def close(self):
        self._h.remove()


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 16, 16, generator=g)  # pixels in [0, 1]


@pytest.fixture(scope="module")
def sd():
    return tiny_cond_unet(), PNDMScheduler(**vp_scheduler_config()).config, tiny_vae(2)


def run_sd(unet, vae, sched, strength):
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    probe = Probe(unet, sched)
    pipe.progress_bar = probe.progress_bar
    pe = tiny_text_states(1)
    out = pipe(image=_image(), strength=strength, prompt_embeds=pe, guidance_scale=1.0, num_inference_steps=N,
               generator=torch.Generator().manual_seed(0), output_type="latent").images
    probe.close()
    return out, probe, {"encoder_hidden_states": pe.double()}


def _sd_schedulers(config, space):
    heun = HeunDiscreteScheduler.from_config(config)
    heun.set_timesteps(N)
    grid = heun.sigmas[::2].double()  # the N positive points of Heun's grid
    # one restart segment between the last two positive grid points: below every start sigma tested
    seg = [[2, 1, float(grid[-1]), float(grid[-2])]]
    return {
        "heun": FastgenScheduler.from_config(config, solver="heun", schedule="default", state_space=space),
        "restart": RestartScheduler.from_config(config, restart_segments=seg, main_schedule="default",
                                                state_space=space),
        "dpmpp_2m": FastgenScheduler.from_config(config, solver="dpmpp_2m", schedule="default",
                                                 state_space=space),
    }


def _reference(den, sched, probe, cond):
    """The functional solver / restart_sample from the pipeline's initial state at the start sigma."""
    b = sched.begin_index
    sig0 = float(sched._calls.sigmas[b])
    x = probe.first["x"].double() * sched._to_ve_factor(sig0)
    flat, jumps, main = sched._flat
    k = int((flat[: len(flat)] == flat[flat.tolist().index(sig0)]).nonzero()[0])  # flat index of the start
    if isinstance(sched, RestartScheduler):
        plan = RestartPlan(flat[k:], jumps[k:], float(sched.config.s_noise), main[k:])
        gen = torch.Generator()
        if probe.first["gen"] is not None:  # SD pipelines pass theirs to step()
            gen.set_state(probe.first["gen"])
        else:  # SD3/Flux pass none: the scheduler seeds one from the initial latents
            gen.manual_seed(seed_from_sample(probe.first["x"]))
        return restart_sample(den, x, plan=plan, generator=gen, **cond), plan.nfe
    solver = sched.config.solver
    return solvers.get_solver(solver)(den, x, flat[k:], **cond), solvers.nfe(solver, flat[k:])


def _final_state(out, sched):
    return out.double() * sched._to_ve_factor(sched._final)


@pytest.mark.parametrize("space", ["ve", "vp"])
def test_sd_img2img_strength_matches_diffusers_heun(sd, space):
    unet, config, vae = sd
    den = from_diffusers(copy.deepcopy(unet).double(), config)
    for strength in STRENGTHS:
        ref = HeunDiscreteScheduler.from_config(config)
        _, ref_probe, _ = run_sd(unet, vae, ref, strength)
        ref_sigma = float(ref.sigmas[ref.begin_index])
        for name, sched in _sd_schedulers(config, space).items():
            out, probe, cond = run_sd(unet, vae, sched, strength)
            assert sched.order == (1 if name == "dpmpp_2m" else 2)
            assert float(sched.sigmas[sched.begin_index]) == pytest.approx(ref_sigma, rel=1e-6), (name, strength)
            extra = 2 if name == "restart" else 0  # the segment's 2 calls (below every start sigma)
            want = (ref_probe.calls + 1) // 2 if name == "dpmpp_2m" else ref_probe.calls + extra
            assert probe.calls == want, (name, strength)
            # progress: one tick per main step; the pipeline's warm-up rule counts an extra segment as one more
            assert probe.updates == ref_probe.updates + (name == "restart"), (name, strength)
            x, nfe = _reference(den, sched, probe, cond)
            assert nfe == probe.calls
            assert rel_err(_final_state(out, sched), x) <= TOL, (name, strength)


# ------------------------------------------------------------------ SD3


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_transformer(), FlowMatchEulerDiscreteScheduler(shift=3.0).config, tiny_vae(4)


def run_sd3(tr, vae, sched, strength):
    pipe = StableDiffusion3Img2ImgPipeline(
        transformer=tr, scheduler=sched, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    probe = Probe(tr, sched)
    pipe.progress_bar = probe.progress_bar
    c = tiny_sd3_cond(1)
    out = pipe(image=_image(), strength=strength, prompt_embeds=c["encoder_hidden_states"],
               pooled_prompt_embeds=c["pooled_projections"], guidance_scale=1.0, num_inference_steps=N,
               generator=torch.Generator().manual_seed(0), output_type="latent").images
    probe.close()
    return out, probe, {k: v.double() for k, v in c.items()}


def test_sd3_img2img_strength_matches_flowmatch_heun(sd3):
    tr, config, vae = sd3
    den = from_diffusers(copy.deepcopy(tr).double(), config)
    fm = FlowMatchHeunDiscreteScheduler.from_config(config)
    fm.set_timesteps(N)
    grid = fm.sigmas[::2].double()  # flow times of the N positive points
    lo, hi = (float(t / (1 - t)) for t in (grid[-1], grid[-2]))
    for strength in STRENGTHS:
        ref = FlowMatchHeunDiscreteScheduler.from_config(config)
        _, ref_probe, _ = run_sd3(tr, vae, ref, strength)
        scheds = {
            "heun": FastgenScheduler.from_config(config, solver="heun", schedule="default"),
            "restart": RestartScheduler.from_config(config, restart_segments=[[2, 1, lo, hi]],
                                                    main_schedule="default"),
            "dpmpp_2m": FastgenScheduler.from_config(config, solver="dpmpp_2m", schedule="default"),
        }
        for name, sched in scheds.items():
            out, probe, cond = run_sd3(tr, vae, sched, strength)
            assert sched.config.state_space == "flow"
            assert probe.first["t"] == pytest.approx(float(ref.timesteps[ref.begin_index]), rel=1e-6), name
            extra = 2 if name == "restart" else 0
            want = (ref_probe.calls + 1) // 2 if name == "dpmpp_2m" else ref_probe.calls + extra
            assert probe.calls == want, (name, strength)
            assert probe.updates == ref_probe.updates + (name == "restart"), (name, strength)
            x, nfe = _reference(den, sched, probe, cond)
            assert nfe == probe.calls
            assert rel_err(_final_state(out, sched), x) <= TOL, (name, strength)


# ------------------------------------------------------------------ seeded reproducibility (Flux, SD3)


def _flux_run(tr, sched, seed):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=sched, vae=tiny_vae(2), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    c = tiny_flux_cond(1)
    return pipe(prompt_embeds=c["encoder_hidden_states"], pooled_prompt_embeds=c["pooled_projections"],
                num_inference_steps=6, height=16, width=16, generator=torch.Generator().manual_seed(seed),
                output_type="latent").images


def _sd3_run(tr, sched, seed):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=tiny_vae(4), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    c = tiny_sd3_cond(1)
    return pipe(prompt_embeds=c["encoder_hidden_states"], pooled_prompt_embeds=c["pooled_projections"],
                guidance_scale=1.0, num_inference_steps=5, height=16, width=16,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_seeded_restart_is_reproducible(family):
    """Flux/SD3 pass no generator to step(): jump noise is seeded from the (seeded) initial latents."""
    if family == "flux":
        tr, run = tiny_flux_transformer(), _flux_run
        config = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config
        seg = [[3, 2, 0.5, 2.0]]
    else:
        tr, run = tiny_sd3_transformer(), _sd3_run
        config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
        seg = [[3, 2, 1.0, 4.0]]
    outs = []
    for global_seed in (1, 2):  # the global RNG must not matter
        torch.manual_seed(global_seed)
        sched = RestartScheduler.from_config(config, restart_segments=seg)
        outs.append(run(tr, sched, seed=0))
    assert torch.equal(outs[0], outs[1])
    no_jump = run(tr, RestartScheduler.from_config(config, restart_segments=seg, s_noise=0.0), seed=0)
    assert not torch.equal(outs[0], no_jump)  # the jumps did add noise
    assert not torch.equal(outs[0], run(tr, RestartScheduler.from_config(config, restart_segments=seg), seed=1))
