"""Network builders, generic conditioning, the zoo round trip and the embedded digits teacher."""

from __future__ import annotations

import json

import pytest
import torch

from fastgen.core.denoiser import EDMDenoiser
from fastgen.models import build_network, list_models, load, model_card
from fastgen.models.nets import ConditionEmbedding, DigitsUNet, ResidualMLP, count_parameters
from fastgen.models.zoo import export_model, model_info


def _perturb(net):
    torch.manual_seed(1)
    with torch.no_grad():  # zero-initialised output / FiLM layers would hide the conditioning
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_nets_shapes_and_conditioning(kind):
    torch.manual_seed(0)
    kw = {"in_dim": 64, "width": 32, "depth": 2} if kind == "mlp" else {"block_out_channels": (16, 32)}
    net = _perturb(build_network(kind, num_classes=10, scalars=("d", "beta"), scalar_defaults={"beta": 1.0},
                                 **kw)).eval()
    x = torch.randn(5, 1, 8, 8)
    t = torch.linspace(-1, 1, 5)
    labels = torch.tensor([0, 1, 2, 3, 10])
    with torch.no_grad():
        y = net(x, t, class_labels=labels, d=0.5)
        assert y.shape == x.shape
        # each conditioning input changes the output
        assert not torch.allclose(y, net(x, t, class_labels=labels, d=0.25))
        assert not torch.allclose(y, net(x, t, class_labels=labels, d=0.5, beta=0.3))
        assert torch.allclose(y, net(x, t, class_labels=labels, d=0.5, beta=1.0), atol=1e-6)  # default
        assert not torch.allclose(y, net(x, t, class_labels=(labels + 1) % 10, d=0.5))
        # None means the null label (index num_classes) for every row
        assert torch.allclose(net(x, t, class_labels=None, d=0.5),
                              net(x, t, class_labels=torch.full((5,), 10), d=0.5), atol=1e-6)
        # a scalar t broadcasts like a (B,) tensor
        assert torch.allclose(net(x, 0.3, d=0.5), net(x, torch.full((5,), 0.3), d=0.5), atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown conditioning input\(s\) \['gamma'\]"):
        net(x, t, gamma=1.0)
    with pytest.raises(ValueError, match="class_labels must be in 0..10"):
        net(x, t, class_labels=torch.full((5,), 11))


def test_mlp_accepts_flat_and_image_inputs():
    net = _perturb(ResidualMLP(64, width=16, depth=1)).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x, 0.1).reshape(3, 64), net(x.reshape(3, 64), 0.1), atol=1e-6)
    with pytest.raises(ValueError, match="64 features"):
        net(torch.randn(3, 10), 0.1)


def test_build_network_errors_and_sizes():
    with pytest.raises(ValueError, match="network kind must be one of"):
        build_network("transformer")
    with pytest.raises(ValueError, match=r"unknown mlp network option\(s\) \['widht'\]"):
        build_network("mlp", in_dim=2, widht=3)
    with pytest.raises(ValueError, match="scalar_defaults names"):
        ConditionEmbedding(8, scalars=("d",), scalar_defaults={"beta": 1.0})
    assert count_parameters(ResidualMLP(2, width=8, depth=1, mult=1, emb_dim=8)) > 0
    assert isinstance(build_network("unet", block_out_channels=(16, 32)), DigitsUNet)


def test_zoo_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = {"kind": "mlp", "in_dim": 2, "width": 8, "depth": 1, "num_classes": 3}
    net = _perturb(build_network(**cfg)).eval()
    export_model(net, "toy", cfg, {"type": "edm", "sigma_data": 1.5}, card="# toy\n", weights_dir=tmp_path,
                 dtype=torch.float32, extra={"steps": 7})
    assert list_models(tmp_path) == ["toy"]
    assert model_card("toy", tmp_path) == "# toy\n"
    assert model_info("toy", tmp_path)["steps"] == 7
    d = load("toy", weights_dir=tmp_path)
    ref = EDMDenoiser(net, sigma_data=1.5)
    x, lab = torch.randn(4, 2), torch.tensor([0, 1, 2, 3])
    assert torch.equal(d(x, 0.7, class_labels=lab), ref(x, 0.7, class_labels=lab))
    assert not any(p.requires_grad for p in d.parameters())
    with pytest.raises(ValueError, match=r"unknown model 'nope'; available: \['toy'\]"):
        load("nope", weights_dir=tmp_path)
    (tmp_path / "toy.json").write_text(json.dumps({"network": {**cfg, "width": 9}}))
    with pytest.raises(ValueError, match="do not fit the network"):
        load("toy", weights_dir=tmp_path)


@pytest.mark.skipif("digits-edm" not in list_models(), reason="digits-edm weights not shipped yet")
def test_digits_teacher_generates_the_requested_classes():
    """The embedded teacher's class-conditional samples (Heun, 9 steps) are recognised by the digits
    classifier as the requested class, and its FD_digits is within 3x the train/test distance."""
    from fastgen.core.schedules import karras
    from fastgen.core.solvers import heun
    from fastgen.data import load_digits_split
    from fastgen.metrics.digits import digits_fd, digits_logits

    d = load("digits-edm")
    assert "FD_digits" in model_card("digits-edm")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(500) % 10
    x = torch.randn(500, 1, 8, 8, generator=g) * 80.0
    with torch.no_grad():
        out = heun(d, x, karras(9, 0.002, 80.0), class_labels=labels).clamp(-1, 1)
    acc = float((digits_logits(out).argmax(1) == labels).float().mean())
    assert acc > 0.9
    fd = digits_fd(out)
    fd_real = digits_fd(load_digits_split("train").images)
    assert fd < 3 * fd_real, (fd, fd_real)


@pytest.mark.skipif("digits-flow" not in list_models(), reason="digits-flow weights not shipped")
def test_digits_flow_model_through_the_zoo():
    """The flow model loads as a RectifiedFlowDenoiser; 8 Euler steps in t give the requested classes,
    and its EDM-contract view is the velocity converted exactly (D = x_t + (1 - t) v)."""
    from fastgen.core.denoiser import RectifiedFlowDenoiser
    from fastgen.metrics.digits import digits_logits

    m = load("digits-flow")
    assert isinstance(m, RectifiedFlowDenoiser)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    x = torch.randn(200, 1, 8, 8, generator=g)
    with torch.no_grad():
        for i in range(8):
            x = x + m.net(x, torch.full((200,), i / 8), class_labels=labels) / 8
        acc = float((digits_logits(x.clamp(-1, 1)).argmax(1) == labels).float().mean())
        assert acc > 0.9
        z, t = torch.randn(3, 1, 8, 8, generator=g), 0.25
        d = m(z, (1 - t) / t, class_labels=labels[:3])
        v = m.net(t * z, torch.full((3,), t), class_labels=labels[:3])
        assert torch.allclose(d, t * z + (1 - t) * v, atol=1e-5)
