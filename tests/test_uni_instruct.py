"""Uni-Instruct: the expansion's gradient identity on Gaussians, the f-distill reduction bit for bit,
SiD(alpha = 1/2) for reverse-KL, the y = 0 fixed point, config and CLI."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fastgen.distill import FDistill, FDistillConfig, divergences
from fastgen.distill.ratio import logit_to_ratio
from fastgen.distill.student import toy_mlp
from fastgen.distill.uni_instruct import UniInstruct, UniInstructConfig, phi_derivatives, uni_instruct_terms

DIVS = ("reverse_kl", "forward_kl", "js", "hellinger", "jeffreys", "pearson")
POINTS = ((0.5, 0.8, 0.7), (-0.3, 1.4, 2.0), (0.2, 1.0, 5.0))  # (mu, s, sigma): q0 = N(mu, s^2), p0 = N(0, 1)


def _gh(n: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.hermite.hermgauss(n)  # probabilists' nodes/weights after the rescaling below
    return torch.tensor(x * np.sqrt(2.0)), torch.tensor(w / np.sqrt(np.pi))


def _log_normal(x: torch.Tensor, m, v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    return -0.5 * (x - m) ** 2 / v - 0.5 * torch.log(2 * torch.pi * v)


def _objective_grad(div, mu: float, s: float, sig: float) -> torch.Tensor:
    """d/d(mu, s) of E_{q_sigma}[Phi(r) y^2] (everything a function of (mu, s); 1-D quadrature)."""
    u, w = _gh()
    m, sd = torch.tensor(mu, dtype=torch.float64, requires_grad=True), torch.tensor(s, dtype=torch.float64,
                                                                                    requires_grad=True)
    vq, vp = sd**2 + sig**2, 1.0 + sig**2
    x = m + vq.sqrt() * u
    r = torch.exp(_log_normal(x, 0.0, vp) - _log_normal(x, m, vq))
    y = -x / vp + (x - m) / vq
    return torch.stack(torch.autograd.grad((w * div.h(r) * y**2).sum(), (m, sd)))


def _surrogate_grad(div, mu: float, s: float, sig: float) -> torch.Tensor:
    """d/d(mu, s) of E_{z,n}[(sim + x.g) / sigma^4] from uni_instruct_terms: the networks (exact Gaussian
    denoisers and ratio) have frozen parameters but see the differentiable x_t = mu + s z + sigma n."""
    u, w = _gh()
    zz, nn_ = (t.reshape(-1, 1) for t in torch.meshgrid(u, u, indexing="ij"))
    ww = (w[:, None] * w[None, :]).reshape(-1)
    m, sd = torch.tensor(mu, dtype=torch.float64, requires_grad=True), torch.tensor(s, dtype=torch.float64,
                                                                                    requires_grad=True)
    m0, v0 = m.detach(), sd.detach() ** 2 + sig**2
    x = m + sd * zz
    xt = x + sig * nn_
    d_p = xt - sig**2 * xt / (1 + sig**2)
    d_q = xt - sig**2 * (xt - m0) / v0
    with torch.no_grad():
        r = torch.exp(_log_normal(xt, 0.0, 1 + sig**2) - _log_normal(xt, m0, v0)).reshape(-1)
    sigma = torch.full((len(r),), sig, dtype=torch.float64)
    sim, g = uni_instruct_terms(x, d_p, d_q, r, sigma, div)
    per = (sim + (x * g).sum(1)) / sig**4
    return torch.stack(torch.autograd.grad((ww * per).sum(), (m, sd)))


@pytest.mark.parametrize("name", DIVS)
def test_surrogate_gradient_equals_autograd_of_the_expansion_on_gaussians(name):
    div = divergences.get(name)
    for mu, s, sig in POINTS:
        ref, got = _objective_grad(div, mu, s, sig), _surrogate_grad(div, mu, s, sig)
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-13 * float(ref.abs().max())), (name, mu, s, sig, ref, got)


def test_reference_gradients_match_the_card():
    fkl = _objective_grad(divergences.get("forward_kl"), 0.5, 0.8, 0.7)
    rkl = _objective_grad(divergences.get("reverse_kl"), 0.5, 0.8, 0.7)
    assert torch.allclose(fkl, torch.tensor([0.78315, -1.35283], dtype=torch.float64), atol=6e-6)
    assert torch.allclose(rkl, torch.tensor([0.45043, -0.53235], dtype=torch.float64), atol=6e-6)


def test_phi_derivatives_by_closed_form():
    r = torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0], dtype=torch.float64)
    phi, d1, d2 = phi_derivatives(divergences.get("js"), r)
    assert torch.allclose(phi, r / (1 + r), rtol=1e-14)
    assert torch.allclose(d1, 1 / (1 + r) ** 2, rtol=1e-13)
    assert torch.allclose(d2, -2 / (1 + r) ** 3, rtol=1e-13)
    phi, d1, d2 = phi_derivatives(divergences.get("reverse_kl"), r)
    assert torch.equal(phi, torch.ones_like(r)) and not d1.any() and not d2.any()


# ----------------------------------------------------------------------------- the method


def _toy(seed: int):
    torch.manual_seed(seed)
    return toy_mlp(4, 32, 2, edm=True)


def _batch(m, n: int = 16):
    g = torch.Generator().manual_seed(3)
    z, eps = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    return z, m.sample_sigma(n, g, torch.device("cpu")), eps


def _cfg(**kw):
    base = dict(sample_shape=(4,), placement="input", sigma_max=80.0, lambda_gan=1e-2, ratio_bins=4)
    return {**base, **kw}


@pytest.mark.parametrize("divergence,regression", [("js", 0.0), ("reverse_kl", 0.0), ("js", 2.0)])
def test_sim_off_and_fdistill_di_is_fdistill_bit_for_bit(divergence, regression):
    teacher, fake = _toy(0), _toy(1)
    kw = dict(divergence=divergence, regression_weight=regression)  # with DMD's regression term too
    fd = FDistill(teacher, FDistillConfig(**_cfg(**kw)), fake_score=copy.deepcopy(fake))
    ui = UniInstruct(teacher, _cfg(**kw, sim_weight=0.0, di_term="fdistill"), fake_score=copy.deepcopy(fake))
    ui.student.load_state_dict(fd.student.state_dict())
    ui.disc.load_state_dict(fd.disc.state_dict())
    z, sigma, eps = _batch(fd)
    (l1, _), (l2, _) = fd.student_loss(z, sigma, eps, {}), ui.student_loss(z, sigma, eps, {})
    g1 = torch.autograd.grad(l1, list(fd.student.parameters()))
    g2 = torch.autograd.grad(l2, list(ui.student.parameters()))
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert ("loss_regression" in ui.last_logs) == (regression > 0)


def test_reverse_kl_exact_is_sid_with_alpha_one_half():
    teacher, fake = _toy(0), _toy(1)
    m = UniInstruct(teacher, _cfg(divergence="reverse_kl", lambda_gan=0.0, dmd_eps=0.0), fake_score=fake)
    z, sigma, eps = _batch(m)
    loss, _ = m.student_loss(z, sigma, eps, {})
    params = list(m.student.parameters())
    got = torch.autograd.grad(loss, params)
    # SiD: (1 - alpha) ||D_p - D_q||^2 + (D_p - D_q).(D_q - x), alpha = 1/2, over wf = mean|x - D_p|
    x = m.student(z, {})
    xt = x + sigma[:, None] * eps
    d_p = teacher(xt, sigma)
    for p in fake.parameters():
        p.requires_grad_(False)
    d_q = fake(xt, sigma)
    wf = (x - d_p).abs().mean(1).detach()
    sid = (0.5 * ((d_p - d_q) ** 2).sum(1) + ((d_p - d_q) * (d_q - x)).sum(1)) / wf
    ref = torch.autograd.grad((2 * sid / 4).mean(), params)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    assert m.last_logs["h_min"] == m.last_logs["h_max"] == 1.0


def test_fake_equal_to_teacher_gives_no_update_and_no_fake_score_gradient():
    teacher = _toy(0)

    def grads(fake):
        m = UniInstruct(teacher, _cfg(divergence="js", lambda_gan=0.0), fake_score=fake)
        z, sigma, eps = _batch(m)
        loss, _ = m.student_loss(z, sigma, eps, {})
        loss.backward()
        return m, torch.cat([p.grad.reshape(-1) for p in m.student.parameters()])

    m, g0 = grads(copy.deepcopy(teacher))  # y = 0: every term vanishes (up to float32 rounding of a zero sum)
    _, g1 = grads(_toy(1))
    assert float(g0.abs().max()) < 1e-6 * float(g1.abs().max())
    assert all(p.grad is None for p in m.fake_score.parameters())
    assert all(p.requires_grad for p in m.fake_score.parameters())


def test_exact_js_loss_is_the_weighted_surrogate():
    teacher, fake = _toy(0), _toy(1)
    m = UniInstruct(teacher, _cfg(divergence="js", lambda_gan=0.0, sim_weight=0.7, di_weight=1.3), fake_score=fake)
    with torch.no_grad():
        m.disc.body[-1].bias.add_(0.8)  # a non-trivial ratio
    z, sigma, eps = _batch(m)
    loss, _ = m.student_loss(z, sigma, eps, {})
    params = list(m.student.parameters())
    got = torch.autograd.grad(loss, params)
    x = m.student(z, {})
    xt = x + sigma[:, None] * eps
    with torch.no_grad():
        r = logit_to_ratio(m.disc(xt, sigma), 10.0, (0.1, 20.0))
        r_t = m.bins.shard_normalise(r, sigma)  # the step's bins (rho = 0: this batch's bin means)
    for p in fake.parameters():
        p.requires_grad_(False)
    d_p, d_q = teacher(xt, sigma), fake(xt, sigma)
    sim, g = uni_instruct_terms(x, d_p, d_q, r_t, sigma, m.div)
    w = 1 / (((x - d_p).abs().mean(1) + 1e-6) * 4 * m.div.h(r_t).mean()).detach()
    ref = torch.autograd.grad((w * (0.7 * sim + 1.3 * (x * g).sum(1))).mean(), params)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_bad_uni_instruct_configs():
    with pytest.raises(ValueError, match="di_term"):
        UniInstructConfig(sample_shape=(4,), placement="input", di_term="sid")
    with pytest.raises(ValueError, match="sim_weight"):
        UniInstructConfig(sample_shape=(4,), placement="input", sim_weight=-1.0)
    with pytest.raises(ValueError, match="unknown"):
        UniInstructConfig.from_dict({"sample_shape": (4,), "placement": "input", "lam_sim": 1.0})


def test_cli_distill_runs_uni_instruct_on_the_ring(tmp_path):
    from fastgen.cli import main
    from fastgen.commands._configs import resolve_config
    from fastgen.train import load_config
    from fastgen.train.method import build_method

    cfg = load_config(resolve_config("ring-js", "distill"), ["method.name=uni_instruct", "method.sim_weight=0.5"])
    method = build_method(cfg)
    assert isinstance(method, UniInstruct) and method.config.sim_weight == 0.5 and method.config.di_term == "exact"

    rc = main(["distill", "ring-js", "--no-progress", "--set", "method.name=uni_instruct", "--set", "steps=6",
               "--set", f"output_dir={tmp_path}", "--set", "checkpoint_every=1000", "--set", "data.num_samples=512"])
    assert rc == 0
    from fastgen.distill import load_student

    student, _ = load_student(tmp_path / "student.safetensors")
    x = student(torch.randn(8, 2), {})
    assert x.shape == (8, 2) and torch.isfinite(x).all()
