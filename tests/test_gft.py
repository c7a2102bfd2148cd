"""GFT: the beta parameterisation (hand-computed), dropped rows, the no-grad eval-mode unconditional pass,
zero-initialised beta embedding, half the network calls of CFG, and a small trained toy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgen.core.denoiser import EDMDenoiser
from fastgen.core.schedules import karras
from fastgen.core.solvers import euler
from fastgen.models.nets import build_network
from fastgen.samplers.guidance import cfg, gft
from fastgen.train.gft import GFTMethod, gft_mixture, zero_init_beta


def test_gft_mixture_hand_computed_and_gradient():
    d_s = torch.tensor([[1.0], [2.0]], requires_grad=True)
    d_u = torch.tensor([[3.0], [5.0]], requires_grad=True)
    beta = torch.tensor([0.25, 0.5])
    out = gft_mixture(d_s, d_u, beta)
    assert torch.allclose(out[:, 0], torch.tensor([0.25 * 1 + 0.75 * 3, 0.5 * 2 + 0.5 * 5]))  # 2.5, 3.5
    out.sum().backward()
    assert torch.equal(d_s.grad[:, 0], beta)
    assert d_u.grad is None  # stop-gradient on the unconditional branch


def test_optimum_is_cfg_at_w_inverse_beta():
    """If D^s = D^u + (1/beta)(D^c - D^u) (CFG at w = 1/beta), the mixture returns D^c exactly."""
    g = torch.Generator().manual_seed(0)
    d_c, d_u = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    beta = torch.tensor([0.1, 0.25, 0.5, 0.8, 1.0], dtype=torch.float64)
    d_s = d_u + (1 / beta[:, None]) * (d_c - d_u)
    assert torch.allclose(gft_mixture(d_s, d_u, beta), d_c, atol=1e-12)
    # and one GFT pass at beta = 1/w equals the CFG combination of D^c, D^u at w
    w = 1 / beta[:, None]
    assert torch.allclose(d_s, d_u + w * (d_c - d_u), atol=1e-12)


class RecordingNet(nn.Module):
    """net(x, c_noise, class_labels, beta) = a * x + b * beta + c * label; records every call."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(2.0))
        self.c = nn.Parameter(torch.tensor(0.1))
        self.calls: list[dict] = []

    def forward(self, x, c_noise, class_labels=None, beta=None):
        self.calls.append({
            "labels": class_labels.clone(), "beta": beta.clone(), "grad": torch.is_grad_enabled(),
            "training": self.training,
        })
        return self.a * x + self.b * beta[:, None] + self.c * class_labels[:, None].float()


def test_dropped_rows_get_beta_one_and_unconditional_pass_is_nograd_eval():
    net = RecordingNet()
    method = GFTMethod(net, label_dropout=0.5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, generator=g)
    labels = torch.randint(0, 3, (64,), generator=g)
    loss = method.step({"x": x0, "label": labels}, 0, g)["main"]
    assert len(net.calls) == 2
    unc, samp = net.calls
    # unconditional pass: null label 3, beta = 1, no grad, eval mode; training mode restored afterwards
    assert unc["labels"].eq(3).all() and unc["beta"].eq(1).all()
    assert not unc["grad"] and not unc["training"] and net.training
    # sampling pass: dropped rows (null label) receive beta = 1, kept rows the sampled beta
    dropped = samp["labels"] == 3
    assert 10 < int(dropped.sum()) < 54
    assert samp["beta"][dropped].eq(1).all()
    assert (samp["beta"][~dropped] < 1).all() and samp["grad"] and samp["training"]
    assert torch.equal(samp["labels"][~dropped], labels[~dropped])
    loss.backward()
    assert net.a.grad is not None


def test_gft_loss_matches_formula_and_unconditional_gets_no_gradient():
    torch.manual_seed(0)
    net = build_network("mlp", in_dim=2, width=16, depth=1, num_classes=3, scalars=("beta",))
    method = GFTMethod(net, sigma_data=0.5, label_dropout=0.3)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(32, 2, generator=g)
    labels = torch.randint(0, 3, (32,), generator=g)
    inp = method.sample_inputs(x0, labels, g)
    loss = method.loss(x0, inp)
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    # reference: the formula written out, with D^u computed separately as a constant
    den = EDMDenoiser(net, sigma_data=0.5)
    s = inp["sigma"]
    x = x0 + s[:, None] * inp["noise"]
    with torch.no_grad():
        d_u = den(x, s, class_labels=torch.full((32,), 3), beta=torch.ones(32))
    d_s = den(x, s, class_labels=inp["labels_in"], beta=inp["beta_in"])
    b = inp["beta"][:, None]
    lam = (s**2 + 0.25) / (s * 0.5) ** 2
    ref = (lam * ((b * d_s + (1 - b) * d_u - x0) ** 2).mean(1)).mean()
    assert torch.allclose(loss, ref, rtol=1e-6)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()), allow_unused=True)
    for a, r in zip(grads, ref_grads):
        assert (a is None and r is None) or torch.allclose(a, r, rtol=1e-5, atol=1e-7)


def test_zero_init_beta_starts_at_the_pretrained_model():
    torch.manual_seed(0)
    teacher = build_network("mlp", in_dim=2, width=32, depth=2, num_classes=3)
    for p in teacher.parameters():  # make the zero-initialised output layer non-trivial
        nn.init.normal_(p, std=0.2)
    student = build_network("mlp", in_dim=2, width=32, depth=2, num_classes=3, scalars=("beta",))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("cond.scalar_embed.beta") for k in missing)
    zero_init_beta(student)
    x = torch.randn(8, 2)
    t = torch.linspace(-1, 1, 8)
    y = torch.arange(8) % 4
    ref = teacher(x, t, class_labels=y)
    for beta in (0.1, 0.5, 1.0):
        assert torch.allclose(student(x, t, class_labels=y, beta=torch.full((8,), beta)), ref, atol=1e-6)
    with pytest.raises(ValueError, match="scalar embedding"):
        zero_init_beta(teacher)


class Counting(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, *a, **k):
        self.calls += 1
        return self.net(*a, **k)


def test_gft_uses_half_the_network_calls_of_cfg():
    torch.manual_seed(0)
    counter = Counting(build_network("mlp", in_dim=2, width=16, depth=1, num_classes=3, scalars=("beta",)))
    den = EDMDenoiser(counter)
    sig = karras(8, 0.01, 20.0)
    x = torch.randn(4, 2) * sig[0]
    y = torch.tensor([0, 1, 2, 0])
    euler(cfg(den, 2.0, uncond={"class_labels": torch.tensor(3)}), x, sig, class_labels=y)
    n_cfg = counter.calls
    counter.calls = 0
    euler(gft(den, 2.0), x, sig, class_labels=y)
    assert n_cfg == 16 and counter.calls == 8


def test_bad_gft_arguments_raise():
    net = RecordingNet()
    with pytest.raises(ValueError, match="label_dropout"):
        GFTMethod(net, label_dropout=1.5)
    with pytest.raises(ValueError, match="beta_min"):
        GFTMethod(net, beta_min=0.5, beta_max=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        GFTMethod(net, num_classes=0)
    with pytest.raises(ValueError, match="label"):
        GFTMethod(net).step({"x": torch.zeros(2, 2)}, 0, torch.Generator())


def test_trainer_runs_the_mixture_gft_config(tmp_path):
    import math

    from fastgen.train import Trainer, load_config

    cfg = load_config("fastgen/configs/train/mixture-gft.yaml",
                      ["steps=2", "batch_size=64", f"output_dir={tmp_path}", "progress=false", "log_every=1"])
    recs = Trainer(cfg).train()
    assert len(recs) == 2 and all(math.isfinite(r["loss/main"]) and "loss_u" in r for r in recs)
    with pytest.raises(ValueError, match="beta"):
        overrides = ["network.scalars=[]", f"output_dir={tmp_path}/b"]
        Trainer(load_config("fastgen/configs/train/mixture-gft.yaml", overrides))
