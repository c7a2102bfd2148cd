"""Flux pipeline folders through ``load_model`` and ``fastgen sample`` (FluxPipeline: packed 2x2 latents).

The key check: the loaded denoiser (unpacked latents, flow time in [0, 1]) driven by fastgen's Euler solver
on the pipeline's own sigma grid reproduces ``FluxPipeline(...)`` from the same initial noise. The grid
starts at flow t = 1 (VE sigma = inf); fastgen starts at VE sigma 1e9 in float64 (t = 1 - 1e-9).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fastgen.cli import main
from fastgen.core import schedules, solvers
from fastgen.models import load_model
from fastgen.models.flux import latent_image_ids, pack, unpack

TEXTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from _tiny_pipelines import save_flux_pipeline

    return save_flux_pipeline(tmp_path_factory.mktemp("flux") / "flux")


@pytest.fixture(scope="module")
def pipe(flux_folder):
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(str(flux_folder), local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    ref = FluxPipeline._pack_latents(x, 2, 4, 6, 8)
    assert torch.equal(pack(x), ref) and torch.equal(unpack(ref, 6, 8), x)
    assert torch.equal(latent_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even height and width"):
        pack(torch.zeros(1, 4, 5, 8))


def test_loaded_flux_model_contract(flux_folder):
    m = load_model(flux_folder)
    assert m.kind == "teacher" and m.conditioning == "prompt" and m.latent
    assert m.shape == (4, 8, 8)  # in_channels 16 / 4; VAE sample_size 8 / scale 1
    assert m.denoiser.timestep_scale == 1.0  # Flux's transformer multiplies t by 1000 itself
    assert m.sigma_max == schedules.FLOW_SIGMA_MAX and m.sigma_min == pytest.approx(0.001 / 0.999, rel=1e-6)
    c = m.encode_prompt(TEXTS)
    assert c["encoder_hidden_states"].shape == (2, 16, 64) and c["pooled_projections"].shape == (2, 8)
    assert not any(v.requires_grad for v in c.values())


def test_euler_on_the_pipeline_grid_equals_flux_pipeline(flux_folder, pipe):
    from diffusers import FluxPipeline

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=4, guidance_scale=1.0, height=8, width=8, max_sequence_length=16)
    with torch.no_grad():
        out = pipe(TEXTS, latents=FluxPipeline._pack_latents(noise, 2, 4, 8, 8), output_type="latent", **kw).images
        img = pipe(TEXTS, latents=FluxPipeline._pack_latents(noise, 2, 4, 8, 8), output_type="pt", **kw).images
    t = pipe.scheduler.sigmas.double()  # flow times the pipeline used: 1, .75, .5, .25, 0
    assert t.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    ref = FluxPipeline._unpack_latents(out, 8, 8, pipe.vae_scale_factor)

    m = load_model(flux_folder)
    sig = torch.cat([torch.tensor([1e9], dtype=torch.float64), t[1:] / (1 - t[1:])])  # VE sigma t / (1 - t)
    den = copy.deepcopy(m.denoiser).double()
    cond = {k: v.double() for k, v in m.encode_prompt(TEXTS).items()}
    with torch.no_grad():
        x = solvers.euler(den, noise.double() * (1 + sig[0]), sig, **cond)  # x_VE = x_fm (1 + sigma)
        dec = m.decode(x.float())
    err = _rel(x, ref)
    print(f"flux euler vs FluxPipeline: max rel diff {err:.3g}")
    assert err < 1e-5
    torch.testing.assert_close((dec / 2 + 0.5).clamp(0, 1), img, atol=1e-5, rtol=1e-5)


def test_cli_samples_a_flux_folder(flux_folder, pipe, tmp_path, capsys):
    out = tmp_path / "f.npz"
    assert main(["sample", "--model", str(flux_folder), "--prompt", "a cat", "--steps", "4", "--num", "2",
                 "--out", str(out), "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = torch.from_numpy(np.load(out)["samples"])
    assert got.shape == (2, 1, 8, 8) and info["shape"] == [1, 8, 8]  # decoded images
    # By hand: the pipeline's own encoder and VAE, Heun on the Karras grid over the model's range.
    m = load_model(flux_folder)
    with torch.no_grad():
        e, p, _ = pipe.encode_prompt(["a cat"] * 2, None, device="cpu", max_sequence_length=16)
        noise = torch.randn(2, *m.shape, generator=torch.Generator().manual_seed(0))
        sig = schedules.karras(4, m.sigma_min, m.sigma_max).float()
        lat = solvers.heun(m.denoiser, noise * sig[0], sig, encoder_hidden_states=e, pooled_projections=p)
        vae = pipe.vae
        img = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(got, img, atol=1e-5, rtol=1e-4)
    assert info["identity"] == m.identity()
    # CFG against a negative prompt: both branches padded to the same T5 length, the uncond pass batched.
    from fastgen.samplers.guidance import cfg

    assert main(["sample", "--model", str(flux_folder), "--prompt", "a cat", "--negative-prompt", "blur",
                 "--guidance", "3", "--steps", "2", "--num", "2", "--out", str(out), "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = torch.from_numpy(np.load(out)["samples"])
    with torch.no_grad():
        ne, np_, _ = pipe.encode_prompt(["blur"] * 2, None, device="cpu", max_sequence_length=16)
        den = cfg(m.denoiser, 3.0, {"encoder_hidden_states": ne, "pooled_projections": np_})
        sig = schedules.karras(2, m.sigma_min, m.sigma_max).float()
        lat = solvers.heun(den, noise * sig[0], sig, encoder_hidden_states=e, pooled_projections=p)
        img = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(got, img, atol=1e-5, rtol=1e-4)
    assert info["nfe"] == 2 * 3  # Heun 2 steps = 3 evaluations, CFG x2


def test_guidance_distilled_transformer_gets_the_pipelines_guidance():
    """``guidance_embeds=True`` (FLUX.1-dev style): FluxUnpacked passes ``guidance`` as FluxPipeline does."""
    from _tiny_models import _reinit
    from _tiny_pipelines import _vae
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from fastgen.core.denoiser import DiffusersFlowDenoiser
    from fastgen.models.flux import FluxUnpacked

    torch.manual_seed(5)
    tr = _reinit(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                        pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(4, 6, 6)), 5)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4, 1, shift=0.1), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    e, p = torch.randn(1, 5, 64, generator=g), torch.randn(1, 8, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        out = pipe(prompt_embeds=e, pooled_prompt_embeds=p, latents=FluxPipeline._pack_latents(noise, 1, 4, 8, 8),
                   num_inference_steps=3, guidance_scale=2.5, height=8, width=8, output_type="latent").images
        t = pipe.scheduler.sigmas.double()
        sig = torch.cat([torch.tensor([1e9], dtype=torch.float64), t[1:] / (1 - t[1:])])
        den = DiffusersFlowDenoiser(FluxUnpacked(copy.deepcopy(tr).double(), guidance=2.5), timestep_scale=1.0)
        x = solvers.euler(den, noise.double() * (1 + sig[0]), sig, encoder_hidden_states=e.double(),
                          pooled_projections=p.double())
        other = DiffusersFlowDenoiser(FluxUnpacked(copy.deepcopy(tr).double(), guidance=4.0), timestep_scale=1.0)
        y = solvers.euler(other, noise.double() * (1 + sig[0]), sig, encoder_hidden_states=e.double(),
                          pooled_projections=p.double())
    ref = FluxPipeline._unpack_latents(out, 8, 8, pipe.vae_scale_factor)
    assert _rel(x, ref) < 1e-5
    assert _rel(y, ref) > 1e-3  # the guidance value reaches the network


def test_dynamic_shifting_uses_the_pipelines_mu(flux_folder, tmp_path):
    """A ``use_dynamic_shifting`` scheduler (FLUX.1-dev's) needs ``mu``: the one FluxPipeline computes for
    the default shape's 16 tokens; the sigma range is that grid's."""
    import shutil

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    folder = tmp_path / "flux-dyn"
    shutil.copytree(flux_folder, folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=1.15)
    cfg_file.write_text(json.dumps(cfg))
    m = load_model(folder)
    mu = calculate_shift(16, 4, 64, 0.5, 1.15)
    table = schedules.diffusers_table(cfg, 1000, mu=mu)
    assert m.sigma_min == pytest.approx(float(table[table > 0].min()), rel=1e-12)
    plain = load_model(flux_folder)
    assert m.sigma_min > 1.5 * plain.sigma_min  # exp(mu) > 1 shifts the grid towards noise
