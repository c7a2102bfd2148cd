"""EDM and flow-matching losses against their formulas on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastgen.core.denoiser import EDMDenoiser, RectifiedFlowDenoiser
from fastgen.data.toy import ring_mixture
from fastgen.train.edm import EDMMethod, drop_labels, edm_loss
from fastgen.train.flow import FlowMatchingMethod, flow_matching_loss


class AffineNet(nn.Module):
    """F(x_in, c_noise) = a * x_in + b * c_noise (known closed form)."""

    num_classes = 0

    def __init__(self, a=0.3, b=-0.7):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.a * x + self.b * t


def test_edm_loss_matches_formula():
    x0 = torch.tensor([[0.5, -1.0], [0.2, 0.9]], dtype=torch.float64)
    noise = torch.tensor([[1.0, 0.5], [-2.0, 0.1]], dtype=torch.float64)
    sigma = torch.tensor([0.3, 4.0], dtype=torch.float64)
    den = EDMDenoiser(AffineNet(), sigma_data=0.5)
    expected = 0.0
    for i in range(2):
        s, sd = float(sigma[i]), 0.5
        x = x0[i] + s * noise[i]
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / math.sqrt(s**2 + sd**2)
        c_in = 1 / math.sqrt(s**2 + sd**2)
        f = 0.3 * c_in * x - 0.7 * math.log(s) / 4
        d = c_skip * x + c_out * f
        lam = (s**2 + sd**2) / (s * sd) ** 2
        expected += lam * float(((d - x0[i]) ** 2).mean()) / 2
    assert float(edm_loss(den, x0, sigma, noise)) == pytest.approx(expected, rel=1e-12)


def test_edm_method_step_reproduces_its_draws():
    torch.manual_seed(0)
    from fastgen.models.nets import ResidualMLP

    net = ResidualMLP(2, width=8, depth=1, num_classes=3)
    m = EDMMethod(net, sigma_data=1.0, p_mean=-0.4, p_std=0.9, label_dropout=0.5)
    x0 = torch.randn(64, 2)
    labels = torch.randint(0, 3, (64,))
    loss = m.step({"x": x0, "label": labels}, 0, torch.Generator().manual_seed(5))["main"]
    g = torch.Generator().manual_seed(5)
    sigma = (-0.4 + 0.9 * torch.randn(64, generator=g)).exp()
    noise = torch.randn(64, 2, generator=g)
    drop = torch.rand(64, generator=g) < 0.5
    lab = torch.where(drop, torch.full_like(labels, 3), labels)
    ref = edm_loss(EDMDenoiser(net, sigma_data=1.0), x0, sigma, noise, class_labels=lab)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert 0.35 < float(drop.float().mean()) < 0.65


def test_edm_loss_prefers_exact_denoiser():
    """The exact mixture denoiser attains a lower EDM loss than a perturbed one (same draws)."""
    mix = ring_mixture()
    g = torch.Generator().manual_seed(0)
    x0, _ = mix.sample(4000, g, dtype=torch.float64)
    sigma = (-1.2 + 1.2 * torch.randn(4000, generator=g, dtype=torch.float64)).exp()
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    exact = mix.denoiser()

    class Wrap:
        sigma_data = 1.0

        def __init__(self, shift):
            self.shift = shift

        def __call__(self, x, s):
            return exact(x, s) + self.shift

    l0 = float(edm_loss(Wrap(0.0), x0, sigma, noise))
    l1 = float(edm_loss(Wrap(0.05), x0, sigma, noise))
    assert l0 < l1


def test_drop_labels_rate_and_null():
    labels = torch.zeros(10000, dtype=torch.long)
    out = drop_labels(labels, 0.1, 7, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 7}
    assert abs(float((out == 7).float().mean()) - 0.1) < 0.01
    assert drop_labels(None, 0.1, 7, torch.Generator()) is None


def test_flow_matching_loss_matches_formula():
    class Lin(nn.Module):
        def forward(self, x, t):
            return 2 * x + t.reshape(-1, 1)

    x1 = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    x0 = torch.tensor([[0.1, -0.3], [0.7, 0.2]], dtype=torch.float64)
    t = torch.tensor([0.25, 0.8], dtype=torch.float64)
    expected = 0.0
    for i in range(2):
        xt = (1 - t[i]) * x0[i] + t[i] * x1[i]
        v = 2 * xt + t[i]
        expected += float(((v - (x1[i] - x0[i])) ** 2).mean()) / 2
    assert float(flow_matching_loss(Lin(), x1, x0, t)) == pytest.approx(expected, rel=1e-12)


def test_flow_method_step_reproduces_its_draws():
    torch.manual_seed(0)
    from fastgen.models.nets import ResidualMLP

    net = ResidualMLP(2, width=8, depth=1)
    m = FlowMatchingMethod(net, t_sampling="logit_normal", t_mean=0.3, t_std=0.8, label_dropout=0.0)
    x1 = torch.randn(32, 2)
    loss = m.step({"x": x1}, 0, torch.Generator().manual_seed(2))["main"]
    g = torch.Generator().manual_seed(2)
    t = torch.sigmoid(0.3 + 0.8 * torch.randn(32, generator=g))
    x0 = torch.randn(32, 2, generator=g)
    assert float(loss.detach()) == pytest.approx(float(flow_matching_loss(net, x1, x0, t).detach()), rel=1e-6)
    with pytest.raises(ValueError, match="t_sampling"):
        FlowMatchingMethod(net, t_sampling="beta")


def test_flow_velocity_denoiser_is_exact_for_the_exact_velocity():
    """With the exact rectified-flow velocity of a mixture, the adapter returns the exact denoiser."""
    mix = ring_mixture(num_modes=4, std=0.3)
    exact = mix.denoiser()

    class ExactVelocity(nn.Module):
        def forward(self, xt, t):
            # v = (x_t - E[x0 | x_t]) / t with E[x1|x_t] = D(x_t / t, (1 - t)/t), x0 = (x_t - t x1)/(1 - t)
            tt = t.reshape(-1, 1)
            ex1 = exact(xt / tt, ((1 - t) / t))
            return (ex1 - xt) / (1 - tt)

    x = torch.randn(50, 2, dtype=torch.float64) * 3
    for sigma in (0.05, 1.0, 20.0):
        d = RectifiedFlowDenoiser(ExactVelocity())(x, sigma)
        assert torch.allclose(d, exact(x, sigma), atol=1e-10)
