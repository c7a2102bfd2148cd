"""`fastgen sample` and `fastgen demo` end to end (issue 8)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastgen.cli import main
from fastgen.core import schedules, solvers
from fastgen.core.denoiser import from_diffusers
from fastgen.models import list_models
from tests._tiny_models import tiny_unet, vp_scheduler_config


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = tiny_unet(seed=3, channels=3)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(vp_scheduler_config("linear")))
    path = tmp_path_factory.mktemp("pipe") / "ddpm"
    pipe.save_pretrained(str(path))
    return path, unet


def test_sample_diffusers_folder_equals_functional_solver(ddpm_folder, tmp_path, capsys):
    path, unet = ddpm_folder
    out = tmp_path / "s.npz"
    rc = main(["sample", "--model", str(path), "--sampler", "heun", "--steps", "4", "--num", "3",
               "--seed", "7", "--out", str(out), "--no-progress"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["nfe"] == 7  # Heun: 2 * 4 - 1
    got = torch.from_numpy(np.load(out)["samples"])
    # The same thing by hand: the VP adapter, a Karras grid over the table's range, the seeded noise.
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(path))
    den = from_diffusers(pipe.unet, pipe.scheduler.config)
    sig = schedules.karras(4, den.sigma_min, den.sigma_max).float()
    noise = torch.randn(3, *got.shape[1:], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = solvers.heun(den, noise * sig[0], sig).clamp(-1, 1)
    assert got.shape == (3, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_sample_is_reproducible_and_writes_pngs(ddpm_folder, tmp_path):
    path, _ = ddpm_folder
    for k in (1, 2):
        assert main(["sample", "--model", str(path), "--sampler", "euler", "--steps", "3", "--num", "2",
                     "--out", str(tmp_path / f"png{k}"), "--no-progress"]) == 0
    a = sorted((tmp_path / "png1").glob("*.png"))
    b = sorted((tmp_path / "png2").glob("*.png"))
    assert len(a) == 2 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_sample_clear_errors(ddpm_folder, tmp_path, capsys):
    path, _ = ddpm_folder
    assert main(["sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a zoo model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", str(path), "--sampler", "warp-drive"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    # A schedule learned for another model is refused by name.
    from fastgen.samplers.schedule import Schedule

    sched = Schedule(schedules.karras(4, 0.1, 10.0), method="ld3", solver="euler", nfe=4, model="digits-edm")
    sfile = sched.save(tmp_path / "other.json")
    rc = main(["sample", "--model", str(path), "--sampler", "euler", "--schedule", str(sfile),
               "--out", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2
    assert "made for model 'digits-edm'" in capsys.readouterr().err
    rc = main(["sample", "--model", str(path), "--steps", "0", "--out", str(tmp_path / "o3"), "--no-progress"])
    assert rc == 2
    assert "--steps must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(list_models()))
def test_sample_each_embedded_model(name, tmp_path, capsys):
    out = tmp_path / "s.npz"
    steps = "2" if "shortcut" in name else "4"
    assert main(["sample", "--model", name, "--steps", steps, "--num", "20", "--out", str(out), "--no-progress"]) == 0
    x = np.load(out)["samples"]
    assert x.shape == (20, 1, 8, 8) and np.isfinite(x).all() and np.abs(x).max() <= 1.0
    assert x.std() > 0.1  # not a constant image


def test_demo_refuses_bad_sizes(tmp_path, capsys):
    assert main(["demo", "--quick", "--t2i-num", "5", "--out", str(tmp_path / "d")]) == 2
    assert "--t2i-num must be >= 10" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--num", "200", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in res["rows"]}
    assert {"Diffusers DPM++2M (Karras)", "fastgen DPM++2M, Karras", "fastgen Restart (1 segment)"} <= methods
    assert all(np.isfinite(r["fd"]) and r["fd"] > 0 for r in res["rows"])
    ref = next(r for r in res["rows"] if r["family"] == "reference")
    euler = next(r for r in res["rows"] if r["method"] == "Diffusers Euler (Karras)")
    assert ref["fd"] < euler["fd"]  # 35-NFE Heun beats 6-step Euler on a trained teacher
    for png in ("samples.png", "nfe_vs_fd.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    table = capsys.readouterr().out
    assert "FD_digits" in table and "NFE" in table and "prompt acc" in table
    # Text-to-image: prompts -> digits through each shipped pipeline, its default scheduler vs fastgen's
    # (DPM++2M on the shipped DP schedule) at NFE 6, from the same latents, against a 30-step reference.
    from PIL import Image

    for pipe in ("digits-sd", "digits-sd3"):
        got = {r["family"]: r for r in res["rows"] if r["pipeline"] == pipe}
        ref, default, ours = got[f"{pipe} reference"], got[f"{pipe} default"], got[f"{pipe} fastgen DP"]
        assert ref["rmse"] == 0.0 and default["nfe"] == ours["nfe"] == 6
        # measured (quick demo, seed 0): digits-sd 0.055 vs 0.113 (0.49x); digits-sd3 0.048 vs 0.124 (0.38x,
        # its DP schedule learned on the flow-time grid; 0.82x on the Karras grid)
        assert 0 < ours["rmse"] < 0.7 * default["rmse"], (pipe, ours["rmse"], default["rmse"])
        assert min(ref["accuracy"], default["accuracy"], ours["accuracy"]) >= 0.9  # chance: 0.1
        assert all(np.isfinite(r["fd"]) for r in got.values())
        assert sum(label.startswith(pipe + " ") for label in res["grid"]) == 3
    # one 8x8 row (scale 4, 2 px padding) per grid entry, pipelines included
    assert Image.open(out / "samples.png").size[1] == len(res["grid"]) * (8 * 4 + 2) + 2
