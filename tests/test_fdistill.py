"""FDistill: DMD2 equivalence for reverse-KL, ratio estimator, toy distillation, start-up checks, students."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastgen.core.denoiser import EDMDenoiser
from fastgen.data.toy import ring_mixture
from fastgen.distill import (
    FDistill,
    FDistillConfig,
    OneStepPipeline,
    OneStepStudent,
    load_student,
    save_student,
)
from fastgen.distill.discriminator import XSigmaDiscriminator
from fastgen.distill.ratio import discriminator_loss
from fastgen.distill.student import toy_mlp

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import tiny_unet  # noqa: E402


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic)."""
    a, b = a.double(), b.double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def local_loop(method: FDistill, sample_batch, steps: int, lr: float, seed: int = 0) -> None:
    """The trainer protocol in miniature: per returned loss, zero all grads, backprop, step its optimizer."""
    nets = method.networks()
    opts = {
        name: torch.optim.Adam([p for n in group for p in nets[n].parameters()], lr=lr, betas=(0.0, 0.99))
        for name, group in method.optimizer_groups().items()
    }
    g = torch.Generator().manual_seed(seed)
    for it in range(steps):
        for name, loss in method.step(sample_batch(g), it, g).items():
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()


def _toy_teacher(dim: int = 4, seed: int = 0) -> EDMDenoiser:
    torch.manual_seed(seed)
    return toy_mlp(dim, 32, 2, edm=True)


# ----------------------------------------------------------------------------- DMD2 equivalence


def _dmd2_reference_generator_loss(student, teacher, fake, disc, z, sigma, eps, gan_weight):
    """DMD2's generator loss, transcribed from the official code (edm_guidance.py /
    compute_distribution_matching_loss + compute_generator_clean_cls_loss), no f-weight."""
    latents = student(z)
    noisy = latents + sigma.reshape(-1, 1) * eps
    with torch.no_grad():
        pred_fake_image = fake(noisy.detach(), sigma)
        pred_real_image = teacher(noisy.detach(), sigma)
        p_real = latents.detach() - pred_real_image
        p_fake = latents.detach() - pred_fake_image
        weight_factor = torch.abs(p_real).mean(dim=[1], keepdim=True)
        grad = (p_real - p_fake) / weight_factor
    loss_dm = 0.5 * F.mse_loss(latents, (latents - grad).detach(), reduction="mean")
    logits = disc(noisy, sigma)
    return loss_dm + gan_weight * F.softplus(-logits).mean()


@pytest.mark.parametrize("gan_weight", [0.0, 1e-2])
def test_reverse_kl_student_update_equals_dmd2_bit_for_bit(gan_weight):
    teacher = _toy_teacher(seed=0)
    fake = _toy_teacher(seed=1)
    cfg = FDistillConfig(
        sample_shape=(4,),
        divergence="reverse_kl",
        placement="input",
        lambda_gan=gan_weight,
        dmd_eps=0.0,
        sigma_max=80.0,
    )
    m = FDistill(teacher, cfg, fake_score=fake)
    g = torch.Generator().manual_seed(3)
    z, eps = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    sigma = m.sample_sigma(16, g, torch.device("cpu"))
    loss, _ = m.student_loss(z, sigma, eps, {})
    params = list(m.student.parameters())
    grads = torch.autograd.grad(loss, params)
    ref = _dmd2_reference_generator_loss(m.student, teacher, fake, m.disc, z, sigma, eps, gan_weight)
    ref_grads = torch.autograd.grad(ref, params)
    assert torch.equal(loss, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert m.last_logs["h_min"] == m.last_logs["h_max"] == 1.0
    # a non-constant divergence changes the update on the same batch
    m_js = FDistill(teacher, cfg.__class__(**{**cfg.to_dict(), "divergence": "js"}), fake_score=fake)
    m_js.disc.load_state_dict(m.disc.state_dict())
    with torch.no_grad():
        m_js.disc.body[-1].bias.add_(torch.linspace(0, 1, 1))
        for p in m_js.disc.body[0].parameters():
            p.mul_(5)
    loss_js, _ = m_js.student_loss(z, sigma, eps, {})
    assert not torch.equal(loss_js, loss)


def test_regression_term_pulls_each_noise_to_the_teachers_ode_solution():
    """DMD's regression loss: the target of noise z is the teacher's PF-ODE solution from sigma_max z. For
    one-Gaussian data N(mu, s^2 I) it is closed-form, mu + (sigma_max z - mu) s / sqrt(s^2 + sigma_max^2); the
    term adds lambda_reg * mean((G(z) - target)^2) to the generator loss and nothing else."""
    from fastgen.core.analytic import GaussianMixtureDenoiser

    mu, s, smax = torch.tensor([[0.7, -0.3]]), 0.4, 10.0
    teacher = GaussianMixtureDenoiser(torch.ones(1), mu, torch.tensor([s])).float()
    base = dict(sample_shape=(2,), placement="input", sigma_min=0.002, sigma_max=smax, lambda_gan=0.0)
    m0 = FDistill(teacher, FDistillConfig(**base), student=OneStepStudent(toy_mlp(2)), fake_score=toy_mlp(2, edm=True))
    w = 0.5
    m1 = FDistill(teacher, FDistillConfig(**base, regression_weight=w, regression_grid=1000),
                  student=m0.student, fake_score=m0.fake_score, discriminator=m0.disc)
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    sigma = m0.sample_sigma(32, g, torch.device("cpu"))
    exact = mu + (smax * z - mu) * s / (s**2 + smax**2) ** 0.5
    # Heun on 1000 Karras sigmas: second order, measured 7e-6 max error (2e-4 on 200, 3.5e-2 on 18)
    assert torch.allclose(m1.teacher_ode(z, {}), exact, atol=2e-5, rtol=0)
    loss0, x0 = m0.student_loss(z, sigma, eps, {})
    loss1, x1 = m1.student_loss(z, sigma, eps, {})
    reg = ((x1 - exact) ** 2).mean()
    assert torch.equal(x0, x1)
    diff, reg = float((loss1 - loss0).detach()), float(reg.detach())
    assert abs(diff - w * reg) < 5e-5 * reg  # the ODE target differs from the closed form by <= 7e-6
    assert m1.last_logs["loss_regression"] == pytest.approx(reg, rel=1e-4)
    assert "loss_regression" not in m0.last_logs
    # annealed: linear from w at step 0 to 0 at regression_anneal_steps, then off (no teacher ODE solved)
    m2 = FDistill(teacher, FDistillConfig(**base, regression_weight=w, regression_anneal_steps=10),
                  student=m0.student, fake_score=m0.fake_score, discriminator=m0.disc)
    assert [m2.regression_weight_at(k) for k in (0, 5, 10, 50)] == [w, w / 2, 0.0, 0.0]
    m2.student_loss(z, sigma, eps, {}, step=10)
    assert "loss_regression" not in m2.last_logs
    with pytest.raises(ValueError, match="regression_anneal_steps must be an integer >= 0"):
        FDistillConfig(**base, regression_anneal_steps=-1)
    with pytest.raises(ValueError, match="regression_solver must be one of"):
        FDistillConfig(**base, regression_solver="rk4")
    with pytest.raises(ValueError, match="regression_grid must be an integer >= 2"):
        FDistillConfig(**base, regression_grid=1)
    with pytest.raises(ValueError, match="regression_weight must be a finite number >= 0"):
        FDistillConfig(**base, regression_weight=-1.0)


# ----------------------------------------------------------------------------- ratio estimator


def test_ratio_estimator_recovers_gaussian_log_ratio():
    """A BCE-trained logit on p = N(0,1) (real) vs q = N(1,1) (fake) tracks log p/q = 1/2 - x."""
    torch.manual_seed(0)
    disc = XSigmaDiscriminator(1, hidden=64, depth=2)
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    sigma = torch.full((1024,), 1.0)
    for _ in range(700):
        real = torch.randn(1024, 1, generator=g)
        fake = torch.randn(1024, 1, generator=g) + 1
        loss = discriminator_loss(disc(real, sigma), disc(fake, sigma))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.linspace(-2, 3, 201).reshape(-1, 1)  # held-out grid
    with torch.no_grad():
        est = disc(x, torch.full((201,), 1.0))[:, 0]
    true = 0.5 - x[:, 0]
    corr = torch.corrcoef(torch.stack([est, true]))[0, 1]
    assert corr > 0.999  # measured 0.99999
    inner = (x[:, 0] >= -1.5) & (x[:, 0] <= 2.5)
    assert (est - true)[inner].abs().max() < 0.2  # measured 0.11
    assert (est - true).abs().max() < 0.3  # measured 0.15


# ----------------------------------------------------------------------------- toy distillation


@pytest.mark.slow  # ~11 s alone on one core; more on a loaded machine
def test_gmm_distillation_moves_student_toward_the_mixture():
    """Exact mixture teacher, MLP fake score (fitted to the initial student first), MLP generator."""
    gm = ring_mixture()
    torch.manual_seed(0)
    student = OneStepStudent(toy_mlp(2, 128, 3))
    fake = toy_mlp(2, 128, 3, edm=True)
    cfg = FDistillConfig(
        sample_shape=(2,),
        divergence="js",
        sigma_min=0.02,
        sigma_max=10.0,
        placement="input",
        lambda_gan=1e-3,
        student_every=2,
        t_index_lo=0,
        t_index_hi=999,
    )
    m = FDistill(gm.denoiser().float(), cfg, student=student, fake_score=fake)
    ref, _ = gm.sample(1500, torch.Generator().manual_seed(123))

    def batch(g):
        return {"x": gm.sample(256, g)[0]}

    # fit the fake score to the initial student: critic-only steps (student_every larger than the run)
    warm = FDistill(
        gm.denoiser().float(),
        FDistillConfig(**{**cfg.to_dict(), "student_every": 10**9}),
        student=student,
        fake_score=fake,
        discriminator=m.disc,
    )
    local_loop(warm, batch, 100, lr=1e-3, seed=1)
    before = energy_distance(m.sample(1500, torch.Generator().manual_seed(7)), ref)
    local_loop(m, batch, 601, lr=1e-3)  # ends on a student step (600 % 2 == 0)
    after = energy_distance(m.sample(1500, torch.Generator().manual_seed(7)), ref)
    assert before > 1.0
    print(f"energy distance {before:.4f} -> {after:.4f}")
    assert after < 0.15 * before
    logs = m.last_logs
    for key in (
        "r_min",
        "r_mean",
        "r_max",
        "h_min",
        "h_mean",
        "h_max",
        "loss_dmd",
        "loss_gan_g",
        "grad_x_dmd",
        "loss_fake_score",
        "loss_disc",
    ):
        assert key in logs
    assert 0.1 <= logs["r_min"] <= logs["r_max"] <= 20.0
    assert abs(logs["h_mean"] - 1) < 1e-5
    state = m.state_dict()
    assert set(state) == {"ratio_bins"} and not torch.equal(state["ratio_bins"], torch.ones(10))


# ----------------------------------------------------------------------------- schedule, state, guidance


def test_step_schedule_and_state_roundtrip():
    m = FDistill(
        _toy_teacher(),
        FDistillConfig(sample_shape=(4,), placement="input", student_every=3, critic_on_student_steps=False),
    )
    g = torch.Generator().manual_seed(0)
    keys = [list(m.step({"x": torch.randn(8, 4)}, i, g)) for i in range(4)]
    assert keys == [["student"], ["critic"], ["critic"], ["student"]]
    assert m.optimizer_groups() == {"student": ["student"], "critic": ["fake_score", "disc"]}
    assert m.ema_networks() == ["student"] and set(m.frozen()) == {"teacher"}
    st = {"ratio_bins": torch.arange(10.0)}
    m.load_state_dict(st)
    assert torch.equal(m.state_dict()["ratio_bins"], st["ratio_bins"])
    with pytest.raises(ValueError, match="ratio_bins"):
        m.load_state_dict({"ratio_bins": torch.ones(3)})


def test_cfg_guided_teacher_and_class_conditioning():
    gm = ring_mixture()
    teacher = gm.denoiser().float()
    student = OneStepStudent(toy_mlp(2, 32, 2, num_classes=8))
    fake = toy_mlp(2, 32, 2, edm=True, num_classes=8)
    cfg = FDistillConfig(sample_shape=(2,), placement="input", guidance_scale=2.5, sigma_max=10.0)
    m = FDistill(teacher, cfg, student=student, fake_score=fake, class_conditional=True)
    x, sig = torch.randn(5, 2), torch.full((5,), 1.3)
    lab = torch.tensor([0, 1, 2, 3, 4])
    cond_d, uncond_d = teacher(x, sig, class_labels=lab), teacher(x, sig)
    torch.testing.assert_close(m.teacher_predict(x, sig, {"class_labels": lab}), cond_d + 1.5 * (cond_d - uncond_d))
    out = m.step({"x": torch.randn(6, 2), "label": torch.arange(6)}, 0, torch.Generator().manual_seed(0))
    assert set(out) == {"student", "critic"}
    with pytest.raises(ValueError, match="label"):
        m.step({"x": torch.randn(6, 2)}, 0, torch.Generator())


def test_nan_is_reported_with_where_it_appeared():
    class NaNTeacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.armed = False

        def forward(self, x, sigma, **_):
            return x * float("nan") if self.armed else x * self.w

    t = NaNTeacher()
    m = FDistill(
        t,
        FDistillConfig(sample_shape=(3,), placement="input", divergence="rkl"),
        student=OneStepStudent(toy_mlp(3, 16, 1)),
        fake_score=toy_mlp(3, 16, 1, edm=True),
    )
    t.armed = True
    with pytest.raises(FloatingPointError, match="teacher prediction is not finite at step 5"):
        m.step({"x": torch.randn(4, 3)}, 5, torch.Generator())


# ----------------------------------------------------------------------------- start-up errors


def test_bad_configs_fail_at_startup():
    with pytest.raises(ValueError, match="unknown divergence 'kld'"):
        FDistillConfig(sample_shape=(2,), divergence="kld", placement="input")
    with pytest.raises(ValueError, match="placement"):
        FDistillConfig(sample_shape=(2,), placement="decoder")
    with pytest.raises(ValueError, match="feature_layers"):
        FDistillConfig(sample_shape=(2,), placement="teacher")
    with pytest.raises(ValueError, match="unknown f-distill config keys \\['lr'\\]"):
        FDistillConfig.from_dict({"sample_shape": [2], "lr": 1e-4})
    with pytest.raises(ValueError, match="disc_weight"):
        FDistillConfig(sample_shape=(2,), placement="input", divergence="js", disc_weight=0.0)
    with pytest.raises(ValueError, match="sample_shape"):
        FDistillConfig(placement="input")
    gm_teacher = ring_mixture().denoiser().float()
    # student/teacher shape mismatch: a 3-d generator against a 2-d teacher
    with pytest.raises(ValueError, match="teacher"):
        FDistill(
            gm_teacher,
            FDistillConfig(sample_shape=(3,), placement="input"),
            student=OneStepStudent(toy_mlp(3)),
            fake_score=toy_mlp(3, edm=True),
        )
    # an exact teacher has no parameters to copy into a student
    with pytest.raises(ValueError, match="student has no parameters"):
        FDistill(gm_teacher, FDistillConfig(sample_shape=(2,), placement="input"))
    unet_teacher = EDMDenoiser(tiny_unet(channels=1))
    with pytest.raises(ValueError, match="net.mid'\\] are not submodules"):
        FDistill(
            unet_teacher,
            FDistillConfig(sample_shape=(1, 8, 8), placement="teacher", feature_layers=["net.mid"]),
        )
    with pytest.raises(ValueError, match="student failed on a probe batch"):
        FDistill(
            unet_teacher,
            FDistillConfig(sample_shape=(3, 8, 8), placement="teacher", feature_layers=["net.mid_block"]),
        )


# ----------------------------------------------------------------------------- feature placement


@pytest.mark.parametrize("placement", ["teacher", "fake_score"])
def test_feature_heads_on_a_diffusers_unet(placement):
    """Heads on UNet2DModel features; the GAN term reaches the student through the tapped backbone."""
    teacher = EDMDenoiser(tiny_unet(channels=1))
    layers = ["net.mid_block", "net.down_blocks.0"]
    cfg = FDistillConfig(
        sample_shape=(1, 8, 8),
        placement=placement,
        feature_layers=layers,
        lambda_gan=1.0,
        divergence="forward_kl",
    )
    m = FDistill(teacher, cfg)
    assert len(m.disc.heads) == 2
    # the student starts as the teacher evaluated at sigma_max
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m.student(z), teacher(80 * z, 80.0))
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    sigma = m.sample_sigma(4, g, torch.device("cpu"))
    loss, _ = m.student_loss(z, sigma, eps, {})
    assert m.last_logs["loss_dmd"] == 0.0  # fake score = teacher at start: only the GAN term acts
    grads = torch.autograd.grad(loss, list(m.student.parameters()), allow_unused=True)
    assert sum(float(gr.abs().sum()) for gr in grads if gr is not None) > 0
    critic = m.critic_loss(m.student(z).detach(), sigma, eps, torch.randn(4, 1, 8, 8), sigma, eps, {})
    head_grads = torch.autograd.grad(critic, list(m.disc.parameters()))
    assert all(torch.isfinite(gr).all() for gr in head_grads)
    assert not any(p.requires_grad for p in teacher.parameters())


# ----------------------------------------------------------------------------- students


def test_student_save_load_and_pipeline(tmp_path):
    net = toy_mlp(4, 16, 2, num_classes=3)
    kwargs = {"dim": 4, "hidden": 16, "depth": 2, "num_classes": 3}
    recipe = {"network": {"kind": "toy_mlp", **kwargs}, "wrap": None}
    student = OneStepStudent(net, recipe=recipe)
    save_student(student, tmp_path / "s", (4,), {"divergence": "js"})
    loaded, doc = load_student(tmp_path / "s.safetensors")
    assert doc["metadata"] == {"divergence": "js"} and doc["sample_shape"] == [4]
    z, lab = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        assert torch.equal(loaded(z, lab), student(z, lab))
    pipe = OneStepPipeline.from_pretrained(tmp_path / "s")
    a = pipe(5, class_labels=lab, generator=torch.Generator().manual_seed(1), output_type="pt").images
    b = pipe(5, class_labels=lab, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert a.shape == (5, 4) and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(a, student(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), lab))
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "fastgen-one-step-student", "network": {"kind": "os:system"}}')
    (tmp_path / "bad.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="network kind must be one of .*'os:system'"):
        load_student(tmp_path / "bad")


def test_pipeline_image_outputs():
    denoiser = EDMDenoiser(tiny_unet(channels=1))
    pipe = OneStepPipeline(OneStepStudent(denoiser, sigma=80.0), (1, 8, 8))
    out = pipe(3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (3, 8, 8, 1) and out.min() >= 0 and out.max() <= 1
    pil = pipe(2, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    with pytest.raises(ValueError, match="output_type"):
        pipe(1, output_type="latent")


def test_from_config_with_a_local_diffusers_vp_teacher(tmp_path):
    """fastgen/configs/distill/diffusers-vp.yaml with a tiny UNet2DModel saved locally (no downloads)."""
    import json

    import yaml
    from _tiny_models import vp_scheduler_config

    from fastgen.distill.build import from_config
    from fastgen.train.config import config_from_dict

    tiny_unet(channels=1).save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(vp_scheduler_config()))
    root = Path(__file__).resolve().parent.parent
    data = yaml.safe_load((root / "fastgen" / "configs" / "distill" / "diffusers-vp.yaml").read_text())
    data["method"]["teacher"]["path"] = str(tmp_path)
    m = from_config(config_from_dict(data))
    assert abs(m.config.sigma_max - m.teacher.sigma_max) < 1e-9  # sigma range from the VP table
    out = m.step({"x": torch.randn(4, 1, 8, 8), "label": torch.zeros(4)}, 0, torch.Generator().manual_seed(0))
    assert set(out) == {"student", "critic"} and all(torch.isfinite(v) for v in out.values())
    save_student(m.student, tmp_path / "st", (1, 8, 8))
    loaded, _ = load_student(tmp_path / "st")
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), m.student(z))


def test_real_trainer_runs_fdistill_and_resumes_exactly(tmp_path):
    """fastgen/configs/distill/ring-js.yaml (shrunk) under fastgen's Trainer: ratio bins are checkpointed and a
    resumed run reproduces the uninterrupted one."""
    import yaml

    from fastgen.train import Trainer
    from fastgen.train.config import config_from_dict

    root = Path(__file__).resolve().parent.parent
    base = yaml.safe_load((root / "fastgen" / "configs" / "distill" / "ring-js.yaml").read_text())
    base.update(steps=12, batch_size=64, progress=False, log_every=1, checkpoint_every=6, num_threads=None)
    base["network"] = {"kind": "mlp", "in_dim": 2, "width": 32, "depth": 1}
    base["data"]["num_samples"] = 1024

    def run(out: str, steps: int) -> Trainer:
        tr = Trainer(config_from_dict({**base, "output_dir": str(tmp_path / out), "steps": steps}))
        tr.train()
        return tr

    full = run("a", 12)
    run("b", 6)
    resumed = run("b", 12)
    assert "method/ratio_bins" in full.state_tensors()
    bins_full = full.method.state_dict()["ratio_bins"]
    assert not torch.equal(bins_full, torch.ones_like(bins_full))
    torch.testing.assert_close(resumed.method.state_dict()["ratio_bins"], bins_full, rtol=0, atol=0)
    for name, p in full.networks["student"].state_dict().items():
        torch.testing.assert_close(resumed.networks["student"].state_dict()[name], p, rtol=0, atol=0)
    z = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.isfinite(full.ema_network("student")(z)).all()


def test_saved_student_is_a_zoo_model(tmp_path):
    from fastgen.models import zoo
    from fastgen.models.nets import build_network

    spec = {"kind": "mlp", "in_dim": 4, "width": 16, "depth": 1, "num_classes": 3}
    torch.manual_seed(0)
    net = build_network(**spec)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    wrap = {"type": "edm", "sigma_data": 0.5}
    student = OneStepStudent(EDMDenoiser(net, sigma_data=0.5), sigma=80.0, recipe={"network": spec, "wrap": wrap})
    save_student(student, tmp_path / "digits-fdistill-test", (4,))
    assert "digits-fdistill-test" in zoo.list_models(tmp_path)
    loaded = zoo.load("digits-fdistill-test", weights_dir=tmp_path)
    assert isinstance(loaded, OneStepStudent) and loaded.sigma == 80.0
    z, lab = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, lab), student(z, lab))
    # the zoo's float16 copy: half the bytes, the same network within float16 rounding of its weights
    from safetensors.torch import load_file

    save_student(student, tmp_path / "digits-fdistill-half", (4,), half=True)
    assert {v.dtype for v in load_file(tmp_path / "digits-fdistill-half.safetensors").values()} == {torch.float16}
    half = zoo.load("digits-fdistill-half", weights_dir=tmp_path)
    with torch.no_grad():
        err = (half(z, lab) - student(z, lab)).abs().max() / student(z, lab).abs().max()
    assert 0 < err < 5e-3  # weights rounded to 2^-11 relative, a 2-layer net: a few units of that


def test_cli_distill_writes_a_loadable_student_and_rejects_bad_configs(tmp_path, capsys):
    from fastgen.cli import main

    root = Path(__file__).resolve().parent.parent
    cfg = str(root / "fastgen" / "configs" / "distill" / "ring-js.yaml")
    common = [
        "--no-progress",
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "--set",
        "batch_size=32",
        "--set",
        "network={kind: mlp, in_dim: 2, width: 16, depth: 1}",
        "--set",
        "data.num_samples=256",
    ]
    assert main(["distill", cfg, "--set", "steps=3", *common]) == 0
    student, doc = load_student(tmp_path / "run" / "student")
    assert doc["metadata"]["steps"] == 3 and doc["metadata"]["divergence"] == "js"
    assert student(torch.randn(4, 2)).shape == (4, 2)
    assert main(["distill", cfg, "--set", "method.divergence=tv", *common]) == 2
    assert "unknown divergence 'tv'" in capsys.readouterr().err
    assert (
        main(
            ["distill", cfg, "--set", "method.feature_layers=[net.nope]", "--set", "method.placement=teacher", *common]
        )
        == 2
    )


def test_shipped_digits_student_generates_the_requested_classes():
    """The embedded one-step student: zoo-loadable, class-conditional (measured accuracy 1.000)."""
    from fastgen.metrics import digits_logits
    from fastgen.models import list_models, load

    if "digits-fdistill-js" not in list_models():
        pytest.skip("digits-fdistill-js is not shipped in this checkout")
    student = load("digits-fdistill-js")
    labels = torch.arange(200) % 10
    with torch.no_grad():
        x = student(torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)), labels)
    assert x.shape == (200, 1, 8, 8) and torch.isfinite(x).all()
    acc = (digits_logits(x.clamp(-1, 1)).argmax(1) == labels).float().mean()
    assert acc > 0.9
    pipe = OneStepPipeline(student, (1, 8, 8))
    imgs = pipe(4, class_labels=7, generator=torch.Generator().manual_seed(1), output_type="pil").images
    assert len(imgs) == 4 and imgs[0].size == (8, 8)
