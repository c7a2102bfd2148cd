"""`fastgen schedule {ld3,dp,ays} --model PIPELINE_DIR` (issue 14 item 2-3): the schedule records the model
identity and sigma range, `fastgen sample` runs it on that model and refuses it on another."""

from __future__ import annotations

import json

import pytest
import torch

from fastgen.cli import main
from fastgen.models import load_model
from tests._tiny_models import tiny_unet, vp_scheduler_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from _tiny_pipelines import save_sd_pipeline
    from diffusers import DDPMPipeline, DDPMScheduler

    root = tmp_path_factory.mktemp("sched")
    ddpm = root / "ddpm"
    DDPMPipeline(unet=tiny_unet(seed=1, channels=1),
                 scheduler=DDPMScheduler.from_config(vp_scheduler_config("linear"))).save_pretrained(str(ddpm))
    return {"ddpm": ddpm, "sd": save_sd_pipeline(root / "sd")}


def _schedule(*args: str) -> int:
    return main(["schedule", *args, "--no-progress"])


def test_ld3_on_a_text_pipeline_records_identity_and_runs(folders, tmp_path, capsys):
    out = tmp_path / "ld3.json"
    assert _schedule("ld3", "--model", str(folders["sd"]), "--prompt", "a cat", "--prompt", "a dog",
                     "--solver", "euler", "--nfe", "3", "--num-noise", "6", "--iterations", "2",
                     "--teacher-steps", "6", "--out", str(out)) == 0
    doc = json.loads(out.read_text())
    m = load_model(folders["sd"])
    assert doc["meta"]["model_identity"] == m.identity()
    assert doc["meta"]["model_sigma_range"] == list(m.sigma_range)
    assert doc["sigmas"][0] == pytest.approx(m.sigma_max, rel=1e-6)  # learned inside the model's range
    capsys.readouterr()
    assert main(["sample", "--model", str(folders["sd"]), "--prompt", "a cat", "--sampler", "euler",
                 "--schedule", str(out), "--num", "2", "--out", str(tmp_path / "x.npz"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nfe"] == 3
    # The same schedule on another model (DDPM: a different config and range) is refused.
    rc = main(["sample", "--model", str(folders["ddpm"]), "--sampler", "euler", "--schedule", str(out),
               "--num", "1", "--out", str(tmp_path / "y.npz"), "--no-progress"])
    assert rc == 2 and "was made for model 'sd'" in capsys.readouterr().err


def test_dp_and_ays_on_an_unconditional_pipeline(folders, tmp_path):
    m = load_model(folders["ddpm"])
    assert _schedule("dp", "--model", str(folders["ddpm"]), "--solver", "euler", "--nfe", "3", "--num-noise", "4",
                     "--grid-size", "6", "--out", str(tmp_path / "dp.json")) == 0
    dp = json.loads((tmp_path / "dp.json").read_text())
    assert dp["meta"]["model_identity"]["fingerprint"] == m.identity()["fingerprint"]
    assert len(dp["sigmas"]) == 4 and dp["sigmas"][-1] == 0
    assert _schedule("ays", "--model", str(folders["ddpm"]), "--solver", "euler", "--nfe", "3", "--iterations", "1",
                     "--samples", "16", "--val-noise", "0", "--out", str(tmp_path / "ays.json")) == 0
    ays = json.loads((tmp_path / "ays.json").read_text())
    assert ays["meta"]["model_sigma_range"] == list(m.sigma_range)
    pos = torch.tensor(ays["sigmas"][:-1], dtype=torch.float64)  # the table is float32: 1e-6 relative
    assert float(pos.max()) <= m.sigma_max * (1 + 1e-6) and float(pos.min()) >= m.sigma_min * (1 - 1e-6)


def test_schedule_refuses_students_and_prompts_that_do_not_apply(folders, tmp_path, capsys):
    assert _schedule("ld3", "--model", "digits-fdistill-js", "--out", str(tmp_path / "a.json")) == 2
    assert "no ODE to schedule" in capsys.readouterr().err
    assert _schedule("ld3", "--model", str(folders["ddpm"]), "--prompt", "x", "--nfe", "3", "--solver", "euler",
                     "--out", str(tmp_path / "b.json")) == 2
    assert "do not apply" in capsys.readouterr().err


def test_guidance_makes_the_bed_the_cfg_ode_of_the_pipeline(folders):
    """`--guidance w` learns the schedule for D_u + w (D_c - D_u): the bed's denoiser equals that closed form
    with the empty prompt (or --negative-prompt) as the unconditional branch, computed once and broadcast."""
    from fastgen.commands.schedule import load_testbed

    m = load_model(folders["sd"])
    bed = load_testbed(str(folders["sd"]), prompts=["a cat", "a dog"], guidance=2.5, negative_prompt="a dog")
    assert bed.guidance == 2.5
    cond = bed.cond(4)
    x = torch.randn(4, *bed.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(3.0)
    c, u = m.condition(4, prompts=["a cat", "a dog"], negative_prompt="a dog", guidance=2.5)
    with torch.no_grad():
        d_c, d_u = m.denoiser(x, sigma, **c), m.denoiser(x, sigma, **u)
        got = bed.denoiser(x, sigma, **cond)
    want = d_u + 2.5 * (d_c - d_u)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # Rows 1 and 3 prompt "a dog", the negative prompt itself: guidance changes nothing there.
    assert torch.allclose(got[1::2], d_c[1::2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0::2], d_c[0::2], rtol=1e-3, atol=1e-4)


def test_guidance_is_recorded_and_refused_where_it_does_not_apply(folders, tmp_path, capsys):
    out = tmp_path / "dp.json"
    assert _schedule("dp", "--model", str(folders["sd"]), "--prompt", "a cat", "--guidance", "1.5",
                     "--solver", "euler", "--nfe", "3", "--num-noise", "4", "--grid-size", "6",
                     "--out", str(out)) == 0
    assert json.loads(out.read_text())["meta"]["guidance"] == 1.5
    capsys.readouterr()
    rc = _schedule("dp", "--model", str(folders["ddpm"]), "--guidance", "2", "--solver", "euler", "--nfe", "3",
                   "--out", str(tmp_path / "u.json"))
    assert rc == 2 and "guidance" in capsys.readouterr().err
    rc = _schedule("dp", "--model", str(folders["sd"]), "--prompt", "a cat", "--negative-prompt", "a dog",
                   "--solver", "euler", "--nfe", "3", "--out", str(tmp_path / "n.json"))
    assert rc == 2 and "--negative-prompt needs --guidance" in capsys.readouterr().err


def test_dp_grid_auto_is_flow_for_flow_pipelines_and_karras_otherwise(folders, tmp_path):
    from _tiny_pipelines import save_sd3_pipeline

    from fastgen.core.schedules import flow_uniform, karras

    sd3 = save_sd3_pipeline(tmp_path / "sd3")
    for model, grid, extra in ((sd3, "flow", ["--prompt", "a cat"]), (folders["ddpm"], "karras", [])):
        out = tmp_path / f"{grid}.json"
        assert _schedule("dp", "--model", str(model), "--solver", "euler", "--nfe", "3", "--num-noise", "2",
                         "--grid-size", "6", "--out", str(out), *extra) == 0
        doc = json.loads(out.read_text())
        lo, hi = doc["meta"]["model_sigma_range"]
        fine = (flow_uniform if grid == "flow" else karras)(6, lo, hi)
        assert doc["meta"]["grid"] == grid
        torch.testing.assert_close(torch.tensor(doc["sigmas"], dtype=torch.float64),
                                   fine[doc["meta"]["grid_indices"]], rtol=1e-12, atol=0)


def test_ld3_init_auto_starts_flow_pipelines_at_their_own_spacing(tmp_path):
    """``--init auto`` on a flow pipeline is ``--init flow``: the same initial validation loss, bit for bit,
    and a different one from LD3's log-linear start."""
    from _tiny_pipelines import save_sd3_pipeline

    sd3 = save_sd3_pipeline(tmp_path / "sd3")
    start = {}
    for init in ("auto", "flow", "loglinear"):
        out = tmp_path / f"{init}.json"
        assert _schedule("ld3", "--model", str(sd3), "--prompt", "a cat", "--solver", "euler", "--nfe", "3",
                         "--num-noise", "4", "--iterations", "1", "--teacher-steps", "6", "--init", init,
                         "--out", str(out)) == 0
        start[init] = json.loads(out.read_text())["meta"]["initial_validation"]
    assert start["auto"] == start["flow"] != start["loglinear"]


def test_a_flow_pipeline_denoiser_carries_its_range_so_library_optimisers_use_it(tmp_path):
    """``DiffusersFlowDenoiser`` exposes the scheduler grid's range ([0.001, 1000] at shift 1): a library call
    without ``sigma_max`` starts there, not at EDM's fallback 80."""
    from _tiny_pipelines import save_sd3_pipeline

    from fastgen.samplers.dp import dp_schedule

    m = load_model(save_sd3_pipeline(tmp_path / "sd3"))
    assert (m.denoiser.sigma_min, m.denoiser.sigma_max) == m.sigma_range and m.sigma_max > 100
    cond, _ = m.condition(2, prompts="a cat")
    noise = torch.randn(2, *m.shape, generator=torch.Generator().manual_seed(0))
    s = dp_schedule(m.denoiser, noise, 2, solver="euler", grid_size=4, progress=False, **cond)
    assert float(s.sigmas[0]) == pytest.approx(m.sigma_max) and s.meta["sigma_min"] == pytest.approx(m.sigma_min)
