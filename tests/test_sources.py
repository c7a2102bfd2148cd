"""The one door: ``load_model`` and ``fastgen sample --model X`` for every kind of source (issue 12, 14).

Each CLI test recomputes the samples by hand (seeded noise, a Karras grid over the model's own sigma
range, the functional solver on an independently built denoiser) and asserts the model identity recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgen.cli import main
from fastgen.core import schedules, solvers
from fastgen.core.denoiser import EDMDenoiser, RectifiedFlowDenoiser
from fastgen.models import build_network, load, load_model, model_info
from fastgen.models.sources import check_schedule_fits
from fastgen.models.zoo import ema_state_from_checkpoint, latest_checkpoint_of

CONFIGS = Path(__file__).resolve().parents[1] / "fastgen" / "configs"


def _sample(capsys, *args: str) -> tuple[dict, torch.Tensor]:
    out = [a for a in args if a.endswith(".npz")]
    assert main(["sample", *args, "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return info, torch.from_numpy(np.load(out[0])["samples"])


def _heun_ref(den, shape, n, seed, steps, lo, hi, **cond) -> torch.Tensor:
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    sig = schedules.karras(steps, lo, hi).float()
    with torch.no_grad():
        return solvers.heun(den, noise * sig[0], sig, **cond).clamp(-1, 1)


def _train(tmp_path: Path, config: str, *overrides: str) -> Path:
    run = tmp_path / "run"
    sets = [f"output_dir={run}", "steps=4", "checkpoint_every=2", "log_every=1", *overrides]
    args = ["train", str(CONFIGS / "train" / config), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return run


def test_zoo_models_carry_kind_shape_range_and_identity():
    kinds = {"digits-edm": "teacher", "digits-gft": "gft", "digits-shortcut": "shortcut",
             "digits-fdistill-js": "student", "digits-flow": "teacher"}
    ids = set()
    for name, kind in kinds.items():
        m = load_model(name)
        assert (m.kind, m.shape, m.conditioning, m.num_classes) == (kind, (1, 8, 8), "class", 10)
        assert m.sigma_range == (0.002, 80.0)
        ident = m.identity()
        assert ident["name"] == name and len(ident["fingerprint"]) == 64
        assert load_model(name).identity() == ident  # stable
        ids.add(ident["fingerprint"])
    assert len(ids) == len(kinds)
    st = load_model("digits-fdistill-js")
    assert st.denoiser is None and st.generator is not None
    assert load_model("digits-shortcut").shortcut is not None


def test_conditions_and_options_that_do_not_apply():
    m = load_model("digits-edm")
    cond, uncond = m.condition(12, class_labels="cycle")
    assert cond["class_labels"].tolist() == [i % 10 for i in range(12)] and uncond is None
    cond, uncond = m.condition(3, class_labels=4, guidance=2.0)
    assert cond["class_labels"].tolist() == [4, 4, 4] and uncond == {"class_labels": None}
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\)"):
        m.condition(2, class_labels=10)
    with pytest.raises(ValueError, match="prompts/negative_prompt do not apply"):
        m.condition(2, prompts="a digit")
    with pytest.raises(ValueError, match="guidance does not apply to digits-fdistill-js"):
        load_model("digits-fdistill-js").condition(2, guidance=2.0)
    with pytest.raises(ValueError, match="options .* apply to mixture specs only"):
        load_model("digits-edm", width=3)


def test_mixture_spec_is_the_exact_denoiser():
    from fastgen.data.toy import random_mixture, ring_mixture

    m = load_model("ring-mixture")
    assert (m.kind, m.shape, m.num_classes) == ("exact", (2,), 8)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(m.denoiser(x, 0.5), ring_mixture().denoiser()(x, 0.5))
    r = load_model("mixture:random", dim=3, num_modes=4, seed=2)
    assert r.shape == (3,) and r.num_classes == 4
    x3 = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(r.denoiser(x3, 1.0), random_mixture(3, 4, seed=2).denoiser()(x3, 1.0))
    assert r.identity() != load_model("mixture:random", dim=3, num_modes=4, seed=3).identity()
    with pytest.raises(ValueError, match="mixture must be one of"):
        load_model("mixture:spiral")


def test_sample_mixture_run_all_checkpoint_forms(tmp_path, capsys):
    run = _train(tmp_path, "mixture-edm.yaml", "batch_size=64", "data.num_samples=256")
    ckpt = latest_checkpoint_of(run / "checkpoints")
    net_kw = {"kind": "mlp", "in_dim": 2, "width": 128, "depth": 3, "mult": 2, "num_classes": 8}
    net = build_network(**net_kw)
    net.load_state_dict(ema_state_from_checkpoint(ckpt, "net"))
    ref = _heun_ref(EDMDenoiser(net.eval(), sigma_data=2.0), (2,), 6, 3, 3, 0.002, 80.0,
                    class_labels=torch.arange(6) % 8)
    fingerprints = set()
    for src in (run, run / "checkpoints" / "latest", ckpt):
        info, got = _sample(capsys, "--model", str(src), "--steps", "3", "--num", "6", "--seed", "3",
                            "--out", str(tmp_path / "m.npz"))
        assert got.shape == (6, 2) and info["kind"] == "teacher"
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert info["identity"]["sigma_max"] == 80.0
        fingerprints.add(info["identity"]["fingerprint"])
    assert len(fingerprints) == 1
    assert {load_model(s).identity()["name"] for s in (run, run / "checkpoints" / "latest", ckpt)} == {"run"}
    older = sorted((run / "checkpoints").glob("step_*"))[0]
    assert older != ckpt and load_model(older).identity()["fingerprint"] in fingerprints  # same config


def test_sample_digits_run_writes_pngs_and_identity(tmp_path, capsys):
    run = _train(tmp_path, "digits-flow.yaml", "batch_size=16", "network.width=16", "network.depth=1")
    info, got = _sample(capsys, "--model", str(run), "--steps", "2", "--num", "4", "--class-label", "3",
                        "--out", str(tmp_path / "d.npz"))
    m = load_model(run)
    net = build_network(**{**m.config["network"]})
    net.load_state_dict(ema_state_from_checkpoint(latest_checkpoint_of(run / "checkpoints"), "net"))
    ref = _heun_ref(RectifiedFlowDenoiser(net.eval()), (1, 8, 8), 4, 0, 2, 0.002, 80.0,
                    class_labels=torch.full((4,), 3))
    assert got.shape == (4, 1, 8, 8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert info["identity"] == m.identity()
    assert main(["sample", "--model", str(run), "--num", "3", "--steps", "2", "--out", str(tmp_path / "png"),
                 "--no-progress"]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 3
    assert json.loads((tmp_path / "png" / "samples.json").read_text())["identity"] == m.identity()


def test_sample_exported_student_every_form(tmp_path, capsys):
    from fastgen.distill.student import OneStepStudent, save_student

    info_zoo = model_info("digits-edm")
    teacher = load("digits-edm")
    student = OneStepStudent(teacher, sigma=80.0,
                             recipe={"network": info_zoo["network"], "wrap": info_zoo["denoiser"]})
    save_student(student, tmp_path / "exp" / "student", (1, 8, 8), {"note": "test"})
    z = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = student(z, torch.arange(5) % 10).clamp(-1, 1)
    for src in (tmp_path / "exp", tmp_path / "exp" / "student.safetensors", tmp_path / "exp" / "student.json",
                tmp_path / "exp" / "student"):
        info, got = _sample(capsys, "--model", str(src), "--num", "5", "--seed", "1", "--out", str(tmp_path / "s.npz"))
        assert info["kind"] == "student" and info["nfe"] == 1 and got.shape == (5, 1, 8, 8)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert info["identity"]["sigma_max"] == 80.0
    rc = main(["sample", "--model", str(tmp_path / "exp"), "--guidance", "2", "--out", str(tmp_path / "x.npz"),
               "--no-progress"])
    assert rc == 2 and "--guidance does not apply" in capsys.readouterr().err


def test_sample_zoo_model_records_identity(tmp_path, capsys):
    info, got = _sample(capsys, "--model", "digits-edm", "--steps", "3", "--num", "4", "--seed", "2",
                        "--out", str(tmp_path / "z.npz"))
    ref = _heun_ref(load("digits-edm"), (1, 8, 8), 4, 2, 3, 0.002, 80.0, class_labels=torch.arange(4))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert info["identity"] == load_model("digits-edm").identity()
    rc = main(["sample", "--model", "digits-edm", "--prompt", "a seven", "--out", str(tmp_path / "p.npz"),
               "--no-progress"])
    assert rc == 2 and "do not apply to digits-edm" in capsys.readouterr().err


@pytest.fixture(scope="module")
def text_pipelines(tmp_path_factory):
    from _tiny_pipelines import save_sd3_pipeline, save_sd_pipeline

    root = tmp_path_factory.mktemp("pipes")
    return {"sd": save_sd_pipeline(root / "sd"), "sd3": save_sd3_pipeline(root / "sd3")}


def test_sample_guidance_interval_equals_the_library_and_counts_real_calls(tmp_path, capsys):
    from fastgen.samplers.guidance import cfg

    m = load_model("digits-edm")
    args = ("--model", "digits-edm", "--class-label", "3", "--guidance", "2", "--steps", "3", "--num", "4")
    info, got = _sample(capsys, *args, "--guidance-interval", "0.5", "5", "--out", str(tmp_path / "i.npz"))
    cond, uncond = m.condition(4, class_labels=3, guidance=2.0)
    ref = _heun_ref(cfg(m.denoiser, 2.0, uncond, interval=(0.5, 5.0)), m.shape, 4, 0, 3, m.sigma_min, m.sigma_max,
                    **cond)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    sig = schedules.karras(3, m.sigma_min, m.sigma_max)
    # Heun: D at each step's start, and its corrector at the step's end when that is > 0
    evals = [float(sig[i]) for i in range(len(sig) - 1)] + [float(v) for v in sig[1:] if v > 0]
    assert info["nfe"] == sum(2 if 0.5 <= s <= 5.0 else 1 for s in evals) < 2 * len(evals)
    _, plain = _sample(capsys, *args, "--out", str(tmp_path / "p.npz"))
    assert (got - plain).abs().max() > 1e-3  # the interval changes the samples


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_sample_text_pipeline_with_prompts_and_cfg(family, text_pipelines, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from fastgen.core.denoiser import from_diffusers
    from fastgen.samplers.guidance import cfg

    path = text_pipelines[family]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    info, got = _sample(capsys, "--model", str(path), "--prompts", str(prompts), "--negative-prompt", "blur",
                        "--guidance", "3", "--steps", "2", "--num", "3", "--out", str(tmp_path / "t.npz"))
    m = load_model(path)
    assert got.shape == (3, 1, 8, 8) and info["shape"] == [1, 8, 8]  # decoded images, not latents
    # By hand: the pipeline's own prompt encoder and VAE, CFG against the negative prompt.
    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **extra)
    net = pipe.unet if family == "sd" else pipe.transformer
    texts, neg = ["a cat", "a dog", "a cat"], ["blur"] * 3
    with torch.no_grad():
        if family == "sd":
            c = {"encoder_hidden_states": pipe.encode_prompt(texts, "cpu", 1, False)[0]}
            u = {"encoder_hidden_states": pipe.encode_prompt(neg, "cpu", 1, False)[0]}
        else:
            e, _, p, _ = pipe.encode_prompt(texts, None, None, device="cpu", do_classifier_free_guidance=False)
            ne, _, np_, _ = pipe.encode_prompt(neg, None, None, device="cpu", do_classifier_free_guidance=False)
            c, u = {"encoder_hidden_states": e, "pooled_projections": p}, \
                {"encoder_hidden_states": ne, "pooled_projections": np_}
        den = cfg(from_diffusers(net, pipe.scheduler.config), 3.0, u)
        noise = torch.randn(3, *m.shape, generator=torch.Generator().manual_seed(0))
        sig = schedules.karras(2, m.sigma_min, m.sigma_max).float()
        lat = solvers.heun(den, noise * sig[0], sig, **c)
        vae = pipe.vae
        img = vae.decode(lat / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample.clamp(-1, 1)
    torch.testing.assert_close(got, img, atol=1e-5, rtol=1e-4)
    assert info["identity"] == m.identity() and info["nfe"] == 2 * 3  # Heun 2 steps = 3 evals, CFG x2
    rc = main(["sample", "--model", str(path), "--out", str(tmp_path / "np.npz"), "--no-progress"])
    assert rc == 2 and "give prompts" in capsys.readouterr().err
    rc = main(["sample", "--model", str(path), "--prompt", "a", "--class-label", "3",
               "--out", str(tmp_path / "cl.npz"), "--no-progress"])
    assert rc == 2 and "--class-label does not apply" in capsys.readouterr().err


def test_sample_refuses_schedule_outside_the_model_range(text_pipelines, tmp_path, capsys):
    from fastgen.samplers.schedule import Schedule

    m = load_model(text_pipelines["sd"])
    assert m.sigma_max == pytest.approx(14.6146, rel=1e-4)  # SD 1.x betas
    sfile = Schedule(schedules.karras(3, 0.03, 80.0), method="ld3", solver="euler", nfe=3).save(tmp_path / "s.json")
    args = ["sample", "--model", str(text_pipelines["sd"]), "--prompt", "a cat", "--sampler", "euler",
            "--schedule", str(sfile), "--num", "1", "--out", str(tmp_path / "o.npz"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "[0.03, 80]" in err and "[0.0291675, 14.6146]" in err
    assert main([*args, "--allow-schedule-range"]) == 0
    with pytest.raises(ValueError, match="does not fit"):
        check_schedule_fits((0.001, 10.0), (0.002, 80.0))
    check_schedule_fits((0.002, 80.0), (0.002, 80.0))
    check_schedule_fits((0.001, 100.0), (0.002, 80.0), allow=True)


def test_unknown_sources_are_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a zoo model"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a path must be a Diffusers pipeline folder"):
        load_model(tmp_path / "empty")


def test_text_pipeline_without_transformers_names_the_extra(monkeypatch):
    """The shipped text-to-image pipelines need `transformers` (the `pipelines` extra): without it the door says
    which components need it and the pip command, instead of Diffusers' import error deep in from_pretrained."""
    import importlib.util

    from fastgen.models import load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ValueError, match=r"'text_encoder'.*'tokenizer'.*fastgen-diffusion\[pipelines\]"):
        load_model("digits-sd")


def test_reflow_runs_are_flow_models_and_reflow_students_are_refused():
    """A 2-rectified flow run (reflow, distill_steps 0) is served as a flow ODE model; a k-step reflow student is
    not an ODE model and is refused by name."""
    from fastgen.models.source_loaders import _run_wrapper

    assert _run_wrapper({"name": "reflow", "distill_steps": 0}) == _run_wrapper({"name": "flow"}) == {"type": "flow"}
    assert _run_wrapper({"name": "reflow"}) == {"type": "flow"}
    with pytest.raises(ValueError, match="distill_steps=2 is a few-step student"):
        _run_wrapper({"name": "reflow", "distill_steps": 2})
