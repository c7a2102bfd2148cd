"""Text-to-image f-distill (fastgen.distill.t2i, fastgen.data.prompts) on tiny offline pipelines.

Covers: prompt embeddings computed once (encoder calls counted, also across a restart through the disk
cache), the student at initialisation equal to the teacher's one-step x0 prediction at its fixed time
(VP: sigma_max; flow: t = 1), the flow-parameterisation conversions, exact resume of a short run, real
images from an .npz / a folder encoded once, students saved / reloaded / sampled (OneStepPipeline and
``fastgen sample``), and bad config values refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fastgen.data.prompts
import fastgen.distill  # noqa: F401  (registers the fdistill method and the t2i data set)
from fastgen.core.schedules import flow_t_to_sigma, sigma_to_flow_t, ve_to_flow
from fastgen.distill import t2i
from fastgen.train import Trainer
from fastgen.train.config import config_from_dict

PROMPTS = ["a b", "c d", "e f"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from _tiny_pipelines import save_sd3_pipeline, save_sd_pipeline

    root = tmp_path_factory.mktemp("t2i")
    return {"sd": save_sd_pipeline(root / "sd"), "sd3": save_sd3_pipeline(root / "sd3"), "root": root}


@pytest.fixture(autouse=True)
def _fresh_memo():
    t2i._PREPARED.clear()
    yield
    t2i._PREPARED.clear()


def _cfg(pipe: Path, out: Path, steps: int = 4, data: dict | None = None, method: dict | None = None,
         **top) -> object:
    d = {"model": str(pipe), "prompts": PROMPTS, "real": "teacher", "real_per_prompt": 4, "teacher_steps": 2,
         "guidance": 1.0, "cache_dir": str(out / "cache"), **(data or {})}
    m = {"name": "fdistill", "divergence": "js", "placement": "teacher", "feature_layers": ["model.mid_block"],
         "student_every": 2, "lambda_gan": 0.01, **(method or {})}
    return config_from_dict({"name": "t2i-test", "output_dir": str(out), "seed": 0, "steps": steps, "batch_size": 4,
                             "num_threads": 1, "log_every": 1, "checkpoint_every": 2, "progress": False,
                             "data": {"name": "t2i", **d}, "network": {"kind": "mlp"}, "method": m,
                             "optim": {"lr": 1e-3, "grad_clip": 10.0}, "ema": {"decay": 0.9, "every": 1}, **top})


def _count_text_encoder(monkeypatch) -> list[int]:
    from transformers import CLIPTextModel

    calls = [0]
    orig = CLIPTextModel.forward

    def counted(self, *a, **k):
        calls[0] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(CLIPTextModel, "forward", counted)
    return calls


def test_prompt_embeddings_computed_once(pipes, tmp_path, monkeypatch):
    calls = _count_text_encoder(monkeypatch)
    cfg = _cfg(pipes["sd"], tmp_path, steps=3, method={"guidance_scale": 2.0})
    trainer = Trainer(cfg)
    assert calls[0] == 1  # the 3 prompts and the negative prompt in one encoder pass (method + data set)
    trainer.train()
    assert calls[0] == 1  # training (CFG teacher, student, critics) never re-encodes
    t2i._PREPARED.clear()  # a new process: the disk cache answers
    Trainer(cfg)
    assert calls[0] == 1
    emb = t2i.prepare(**cfg.data.options)["table"]["encoder_hidden_states"]
    assert emb.shape[0] == len(PROMPTS)


def test_vp_student_at_init_is_teacher_one_step_prediction(pipes, tmp_path):
    method = Trainer(_cfg(pipes["sd"], tmp_path)).method
    z = torch.randn(3, *method.config.sample_shape, generator=torch.Generator().manual_seed(1))
    cond = method._cond(torch.tensor([0, 1, 2]))
    s = method.config.sigma_max
    assert method.student.sigma == s == float(method.teacher.table_sigmas[-1])  # the last training timestep
    with torch.no_grad():
        x_student = method.student(z, cond)
        x_teacher = method.teacher(s * z, torch.full((3,), s), **cond)
    assert torch.equal(x_student, x_teacher)


def test_flow_student_at_init_is_teacher_velocity_step_at_t1(pipes, tmp_path):
    cfg = _cfg(pipes["sd3"], tmp_path, method={"feature_layers": ["model.norm_out"]})
    method = Trainer(cfg).method
    assert method.student.flow_t == 1.0 and method.time_sampling == "flow"
    z = torch.randn(3, *method.config.sample_shape, generator=torch.Generator().manual_seed(2))
    cond = method._cond(torch.tensor([2, 0, 1]))
    with torch.no_grad():
        x_student = method.student(z, cond)
        v = method.teacher.model(z, timestep=torch.full((3,), 1000.0), **cond).sample  # SD3: timestep 1000 t
    torch.testing.assert_close(x_student, z - v, rtol=1e-6, atol=1e-6)  # x0 = x_1 - 1 * v (float32)


def test_flow_parameterisation_conversions_exact(pipes, tmp_path):
    cfg = _cfg(pipes["sd3"], tmp_path, method={"feature_layers": ["model.norm_out"], "t_range": [0.1, 0.9]})
    method = Trainer(cfg).method
    # drawn VE sigmas are flow times in t_range, and flow time <-> sigma round-trips (float64)
    sig = method.sample_sigma(2000, torch.Generator().manual_seed(0), torch.device("cpu")).double()
    t = sigma_to_flow_t(sig)
    assert 0.1 - 1e-6 <= float(t.min()) and float(t.max()) <= 0.9 + 1e-6 and float(t.max() - t.min()) > 0.75
    tt = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(sigma_to_flow_t(flow_t_to_sigma(tt)), tt, rtol=1e-12, atol=1e-12)
    # the VE state x0 + sigma eps is the flow state (1 - t) x0 + t eps
    x0 = torch.randn(5, 4, dtype=torch.float64)
    eps = torch.randn(5, 4, dtype=torch.float64)
    s = flow_t_to_sigma(torch.linspace(0.05, 0.95, 5, dtype=torch.float64))
    tb = sigma_to_flow_t(s)[:, None]
    torch.testing.assert_close(ve_to_flow(x0 + s[:, None] * eps, s), (1 - tb) * x0 + tb * eps, rtol=1e-12,
                               atol=1e-12)
    # the teacher at VE sigma is its flow evaluation at t = sigma / (1 + sigma) of x / (1 + sigma), exactly
    teacher = method.teacher.double()
    cond = {k: v.double() for k, v in method._cond(torch.tensor([0, 1, 2])).items()}
    x = torch.randn(3, *method.config.sample_shape, dtype=torch.float64)
    sg = torch.tensor([0.3, 2.0, 40.0], dtype=torch.float64)
    with torch.no_grad():
        a = teacher(x, sg, **cond)
        b = teacher.flow_x0(ve_to_flow(x, sg), sigma_to_flow_t(sg), **cond)
    assert torch.equal(a, b)
    teacher.float()


def test_vp_timestep_sampling_draws_table_entries(pipes, tmp_path):
    method = Trainer(_cfg(pipes["sd"], tmp_path, method={"t_range": [0.5, 0.6]})).method
    table = method.teacher.table_sigmas.double()
    sig = method.sample_sigma(500, torch.Generator().manual_seed(0), torch.device("cpu")).double()
    idx = torch.searchsorted(table, sig - 1e-6)
    torch.testing.assert_close(table[idx], sig, rtol=1e-6, atol=0)  # float32 copies of table entries
    assert int(idx.min()) >= round(0.5 * 999) and int(idx.max()) <= round(0.6 * 999)


def test_short_distill_resumes_bit_exactly(pipes, tmp_path):
    m = {"regression_steps": 1}  # step 0: regression warm-up on teacher pairs; steps 1-3: f-distill
    full = Trainer(_cfg(pipes["sd"], tmp_path / "full", steps=4, method=m))
    logs = full.train()
    assert "loss_regression" in logs[0] and "loss/critic" not in logs[0] and "loss/critic" in logs[1]
    first = Trainer(_cfg(pipes["sd"], tmp_path / "resumed", steps=2, method=m))
    first.train()
    second = Trainer(_cfg(pipes["sd"], tmp_path / "resumed", steps=4, method=m))
    second.train()
    assert second.step == 4
    for name in ("student", "fake_score", "disc"):
        a, b = full.networks[name].state_dict(), second.networks[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = full.ema_network("student").state_dict(), second.ema_network("student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(full.method.bins.means, second.method.bins.means)


def test_real_images_from_npz_and_folder_encoded_once(pipes, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from PIL import Image

    from fastgen.data.prompts import load_images

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", x=imgs, prompts=np.array(["a b", "zz", "a b", "c d", "zz", "e f"]))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(imgs[i]).save(folder / f"{i}.png")
    x, caps = load_images(folder)
    assert x.shape == (4, 1, 8, 8) and caps is None
    torch.testing.assert_close(x[1, 0], torch.from_numpy(imgs[1]).float() / 127.5 - 1)
    (folder / "0.txt").write_text("a b\n")
    with pytest.raises(ValueError, match="caption"):
        load_images(folder)
    calls = [0]
    orig = AutoencoderKL.encode

    def counted(self, *a, **k):
        calls[0] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    opts = dict(model=str(pipes["sd"]), prompts=PROMPTS, real=str(tmp_path / "real.npz"),
                cache_dir=str(tmp_path / "cache"))
    d = t2i.prepare(**opts)
    assert calls[0] == 1 and d["x"].shape == (6, 2, 8, 8)
    assert d["prompts"] == PROMPTS + ["zz"]  # captions join the prompt table
    assert d["prompt"].tolist() == [0, 3, 0, 1, 3, 2]
    t2i._PREPARED.clear()
    d2 = t2i.prepare(**opts)
    assert calls[0] == 1 and torch.equal(d["x"], d2["x"])  # the latent cache answers


def test_student_saves_loads_and_samples(pipes, tmp_path, capsys):
    from fastgen.cli import main
    from fastgen.commands.distill import save_and_export
    from fastgen.distill import OneStepPipeline
    from fastgen.models import load_model

    trainer = Trainer(_cfg(pipes["sd3"], tmp_path, steps=2, method={"feature_layers": ["model.norm_out"]}))
    trainer.train()
    student = trainer.ema_network("student")
    save_and_export(student, trainer.method, tmp_path / "student", None, {"steps": 2})
    doc = json.loads((tmp_path / "student.json").read_text())
    assert doc["pipeline"] == str(pipes["sd3"]) and doc["denoiser"]["flow_t"] == 1.0
    model = load_model(tmp_path)
    assert model.kind == "student" and model.conditioning == "prompt" and model.latent
    cond, _ = model.condition(2, prompts=["c d"])
    z = torch.randn(2, *model.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = student(z, trainer.method._cond(torch.tensor([1, 1])))
    torch.testing.assert_close(model.generator(z, cond), ref, rtol=1e-6, atol=1e-6)
    pipe = OneStepPipeline.from_pretrained(tmp_path)
    out = pipe(prompt=["c d", "a b"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (4, 8, 8, 1) and 0 <= out.min() and out.max() <= 1
    pipe.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "student.json").read_text())["pipeline"] == str(pipes["sd3"])
    assert main(["sample", "--model", str(tmp_path), "--prompt", "a b", "--num", "3", "--out",
                 str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as f:
        arr = f[f.files[0]]
    assert arr.shape[0] == 3


@pytest.mark.parametrize(("where", "key", "value", "match"), [
    ("method", "time_sampling", "bogus", "method.time_sampling"),
    ("method", "t_range", [0.6, 0.2], "method.t_range"),
    ("method", "teacher", "digits-edm", "method.teacher"),
    ("method", "guidance_scale", -1.0, "guidance_scale"),
    ("method", "regression_steps", -1, "method.regression_steps"),
    ("data", "real_per_prompt", 0, "data.real_per_prompt"),
    ("data", "guidance", -2.0, "data.guidance"),
    ("data", "prompts", [], "data.prompts"),
    ("data", "real", str(Path("/nonexistent/real.npz")), "real images not found"),
])
def test_bad_config_values_refused_by_name(pipes, tmp_path, where, key, value, match):
    kw = {where: {key: value}}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        Trainer(_cfg(pipes["sd"], tmp_path, **kw))


def test_regression_needs_teacher_pairs(pipes, tmp_path):
    np.savez(tmp_path / "real.npz", x=np.zeros((4, 1, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="method.regression_steps"):
        Trainer(_cfg(pipes["sd"], tmp_path, data={"real": str(tmp_path / "real.npz")},
                     method={"regression_steps": 2}))
    d = t2i.prepare(**_cfg(pipes["sd"], tmp_path / "pairs").data.options)
    assert d["z"].shape == d["x"].shape  # the pipeline's initial noise of each teacher sample


def test_unknown_data_key_and_flow_time_range_refused(pipes, tmp_path):
    with pytest.raises(ValueError, match="data.bogus"):
        _cfg(pipes["sd"], tmp_path, data={"bogus": 1})
    with pytest.raises(ValueError, match="method.t_range"):
        Trainer(_cfg(pipes["sd3"], tmp_path, method={"feature_layers": ["model.norm_out"], "t_range": [0.1, 1.0]}))
    with pytest.raises(ValueError, match="method.time_sampling"):
        Trainer(_cfg(pipes["sd3"], tmp_path, method={"feature_layers": ["model.norm_out"],
                                                      "time_sampling": "timestep"}))


@pytest.mark.parametrize("name", ["digits-sd", "digits-sd3"])
def test_shipped_configs_load_by_name(name):
    from fastgen.commands._configs import resolve_config
    from fastgen.train import load_config

    cfg = load_config(resolve_config(name, "distill"))
    assert cfg.data.name == "t2i" and cfg.data.options["model"] == name == cfg.method["teacher"]
    assert t2i._resolve(cfg.data.options["prompts"]).is_file()
    assert len(fastgen.data.prompts.read_prompts(t2i._resolve(cfg.data.options["prompts"]))) == 30
