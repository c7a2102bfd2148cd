"""DDPM-IP input perturbation: the perturbed input's variance, the closed-form optima of both targets, the
unchanged baseline at gamma = 0, exact resume, and bad options (``fastgen/train/input_perturbation.py``)."""

from __future__ import annotations

import pytest
import torch

from fastgen.core.denoiser import EDMDenoiser
from fastgen.train import Trainer
from fastgen.train.config import config_from_dict, load_config
from fastgen.train.edm import EDMMethod, edm_loss
from fastgen.train.flow import FlowMatchingMethod, flow_matching_loss
from fastgen.train.input_perturbation import check_ip, ip_generator, ip_noise, perturb_edm, perturb_flow

N = 10**6


def _draws(seed: int, n: int = N, gamma: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
    gxi = gamma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return y, noise, gxi


def _slope(x: torch.Tensor, target: torch.Tensor) -> float:
    """Least-squares slope through the origin (all variables are zero-mean)."""
    return float((x * target).sum() / (x * x).sum())


def test_edm_input_has_variance_sigma2_times_1_plus_gamma2_and_eps_target_keeps_the_noise():
    gamma, sigma = 0.1, 2.0
    y, noise, gxi = _draws(0, gamma=gamma)
    y = torch.zeros_like(y)  # x0 = 0: the input is pure (perturbed) noise
    s = torch.full((N,), sigma, dtype=torch.float64)
    y_in, n_in = perturb_edm(y, noise, s, gxi, "eps")
    x = y_in + sigma * n_in  # what edm_loss feeds the denoiser
    # Var(x) / sigma^2 = 1 + gamma^2 = 1.01, standard error ~ 1.4e-3 relative at 1e6 samples
    assert float(x.var()) / sigma**2 == pytest.approx(1 + gamma**2, rel=6e-3)
    # the epsilon-equivalent target (x - D_target) / sigma is the original noise exactly
    assert torch.allclose((x - y_in) / sigma, noise, atol=1e-12, rtol=0)
    xi = gxi / gamma
    assert abs(float(((x - y_in) / sigma * xi).mean())) < 5e-3  # covariance 0 with xi
    # "x0" target: same input, target y
    y_x0, n_x0 = perturb_edm(y, noise, s, gxi, "x0")
    assert torch.allclose(y_x0 + sigma * n_x0, x, atol=1e-12, rtol=0) and torch.equal(y_x0, y)


def test_edm_closed_form_optima_card_numbers():
    """1-D data N(0, c^2), c = 0.5, sigma = 2, gamma = 0.5 (ddpm-ip card, CPU check 2)."""
    c, sigma, gamma = 0.5, 2.0, 0.5
    y, noise, gxi = _draws(1, gamma=gamma)
    y = c * y
    s = torch.full((N,), sigma, dtype=torch.float64)
    # eps target: the optimal D is linear with slope (c^2 + s^2 g^2) / (c^2 + s^2 (1 + g^2)) = 0.238095;
    # the epsilon prediction (x - D)/sigma then has slope sigma / (c^2 + sigma^2 (1 + g^2)) = 0.380952
    y_in, n_in = perturb_edm(y, noise, s, gxi, "eps")
    x = y_in + sigma * n_in
    assert _slope(x, y_in) == pytest.approx(0.238095, abs=3e-3)
    assert _slope(x, (x - y_in) / sigma) == pytest.approx(0.380952, abs=3e-3)
    # x0 target: slope c^2 / (c^2 + sigma^2 (1 + g^2)) = 0.047619
    y_in, n_in = perturb_edm(y, noise, s, gxi, "x0")
    assert _slope(y_in + sigma * n_in, y_in) == pytest.approx(0.047619, abs=3e-3)
    # baseline (gamma = 0): c^2 / (c^2 + sigma^2) = 0.058824 and sigma / (c^2 + sigma^2) = 0.470588
    x = y + sigma * noise
    assert _slope(x, y) == pytest.approx(0.058824, abs=3e-3)
    assert _slope(x, noise) == pytest.approx(0.470588, abs=3e-3)


def test_flow_input_variance_and_targets():
    gamma, t = 0.1, 0.3
    x1, x0, gxi = _draws(2, gamma=gamma)
    x1 = torch.zeros_like(x1)
    tt = torch.full((N,), t, dtype=torch.float64)
    a1, a0 = perturb_flow(x1, x0, tt, gxi, "eps")
    xt = (1 - t) * a0 + t * a1  # what flow_matching_loss feeds the net
    assert torch.allclose(xt, (1 - t) * (x0 + gxi) + t * x1, atol=1e-12, rtol=0)
    assert float((xt - t * x1).var()) / (1 - t) ** 2 == pytest.approx(1 + gamma**2, rel=6e-3)
    assert torch.allclose(a1 - a0, x1 - x0, atol=1e-12, rtol=0)  # faithful: the unperturbed velocity
    b1, b0 = perturb_flow(x1, x0, tt, gxi, "x0")
    assert torch.allclose((1 - t) * b0 + t * b1, xt, atol=1e-12, rtol=0)
    assert torch.allclose(b1 - b0, x1 - x0 - gxi, atol=1e-12, rtol=0)  # relabel: a broader prior


def _net(num_classes: int = 3):
    from fastgen.models.nets import ResidualMLP

    torch.manual_seed(0)
    net = ResidualMLP(2, width=8, depth=1, num_classes=num_classes)
    with torch.no_grad():  # the output layer starts at zero: give every weight a value, so inputs matter
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return net


@pytest.mark.parametrize("cls", [EDMMethod, FlowMatchingMethod])
def test_gamma_zero_is_the_baseline_bit_for_bit_and_gamma_keeps_the_other_draws(cls):
    net = _net()
    batch = {"x": torch.randn(32, 2, generator=torch.Generator().manual_seed(1)), "label": torch.arange(32) % 3}
    base = cls(net, label_dropout=0.3)
    g0 = torch.Generator().manual_seed(7)
    l0 = base.step(batch, 0, g0)["main"]
    g1 = torch.Generator().manual_seed(7)
    l1 = cls(net, label_dropout=0.3, input_perturbation=0.0).step(batch, 0, g1)["main"]
    assert torch.equal(l0, l1)
    g2 = torch.Generator().manual_seed(7)
    l2 = cls(net, label_dropout=0.3, input_perturbation=0.1).step(batch, 0, g2)["main"]
    assert not torch.equal(l0, l2)
    # the perturbation comes from its own stream: the step generator advanced exactly as in the baseline
    assert torch.equal(g0.get_state(), g2.get_state())


def test_edm_method_with_ip_reproduces_its_formula():
    net = _net(num_classes=0)
    m = EDMMethod(net, sigma_data=0.5, p_mean=-0.4, p_std=0.9, input_perturbation=0.1)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(11)
    loss = m.step({"x": x0}, 0, gen)["main"]
    g = torch.Generator().manual_seed(11)
    sigma = (-0.4 + 0.9 * torch.randn(64, generator=g)).exp()
    noise = torch.randn(x0.shape, generator=g)
    xi = torch.randn(x0.shape, generator=ip_generator(torch.Generator().manual_seed(11)))
    den = EDMDenoiser(net, sigma_data=0.5)
    target = x0 + sigma[:, None] * 0.1 * xi
    d = den(x0 + sigma[:, None] * (noise + 0.1 * xi), sigma)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (lam * ((d - target) ** 2).mean(dim=1)).mean()
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    assert torch.allclose(loss, edm_loss(den, target, sigma, noise), rtol=1e-6, atol=0)


def test_flow_method_with_ip_reproduces_its_formula():
    net = _net(num_classes=0)
    m = FlowMatchingMethod(net, input_perturbation=0.2)
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    loss = m.step({"x": x1}, 0, torch.Generator().manual_seed(5))["main"]
    g = torch.Generator().manual_seed(5)
    t = torch.rand(64, generator=g)
    x0 = torch.randn(x1.shape, generator=g)
    gxi = ip_noise(x1, 0.2, torch.Generator().manual_seed(5))
    xt = (1 - t[:, None]) * (x0 + gxi) + t[:, None] * x1
    expected = ((net(xt, t) - (x1 - x0)) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    a1, a0 = perturb_flow(x1, x0, t, gxi)
    assert torch.allclose(loss, flow_matching_loss(net, a1, a0, t), rtol=1e-6, atol=0)


def test_sampling_is_unchanged_by_the_option():
    net = _net()
    x, s, y = torch.randn(8, 2), torch.full((8,), 1.3), torch.arange(8) % 3
    for cls in (EDMMethod, FlowMatchingMethod):
        a = cls(net).sampling_denoiser()(x, s, class_labels=y)
        b = cls(net, input_perturbation=0.15, ip_target="x0").sampling_denoiser()(x, s, class_labels=y)
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw, needle",
    [({"input_perturbation": -0.1}, "input_perturbation must be a number in [0, 1]"),
     ({"input_perturbation": 2.0}, "input_perturbation must be a number in [0, 1]"),
     ({"input_perturbation": float("nan")}, "input_perturbation"),
     ({"input_perturbation": "lots"}, "input_perturbation"),
     ({"ip_target": "v"}, "ip_target must be one of ('eps', 'x0')")],
)
def test_bad_options_are_named(kw, needle):
    for cls in (EDMMethod, FlowMatchingMethod):
        with pytest.raises(ValueError) as err:
            cls(_net(), **kw)
        assert needle in str(err.value)
    with pytest.raises(ValueError, match="ip_target"):
        check_ip(0.1, "eps ")


def _ip_cfg(tmp_path, method: str, **over):
    cfg = {
        "name": "ip", "output_dir": str(tmp_path / "run"), "seed": 3, "steps": 6, "batch_size": 16,
        "log_every": 1, "checkpoint_every": 2, "progress": False,
        "data": {"name": "mixture", "mixture": "ring", "num_samples": 40},
        "network": {"kind": "mlp", "in_dim": 2, "width": 16, "depth": 1, "num_classes": 8},
        "method": {"name": method, "input_perturbation": 0.1},
        "optim": {"lr": 0.01, "warmup_steps": 2},
    }
    cfg.update(over)
    return config_from_dict(cfg)


@pytest.mark.parametrize("method", ["edm", "flow"])
def test_resume_with_ip_is_bit_exact(tmp_path, method):
    full = Trainer(_ip_cfg(tmp_path / "a", method))
    full.train()

    class Killed(Exception):
        pass

    def kill(tr, logs):
        if tr.step == 3:  # after the step-2 checkpoint
            raise Killed

    with pytest.raises(Killed):
        Trainer(_ip_cfg(tmp_path / "b", method)).train(callback=kill)
    resumed = Trainer(_ip_cfg(tmp_path / "b", method))
    resumed.train()
    ref, out = full.state_tensors(), resumed.state_tensors()
    assert ref.keys() == out.keys()
    for k in ref:
        assert torch.equal(ref[k], out[k]), k


def test_shipped_ip_configs_and_cli_error(tmp_path, capsys):
    from fastgen.cli import main
    from fastgen.commands._configs import resolve_config

    cfg = load_config(resolve_config("digits-edm-ip", "train"))
    assert cfg.method["name"] == "edm" and cfg.method["input_perturbation"] == 0.1
    base = load_config(resolve_config("digits-edm", "train"))
    # equal budget: everything but the option (and the run's name/folder) is the teacher's config
    for field in ("steps", "batch_size", "seed", "network", "optim", "ema", "data"):
        assert getattr(cfg, field) == getattr(base, field), field
    cfg = load_config(resolve_config("mixture-flow-ip", "train"))
    assert cfg.method["name"] == "flow" and cfg.method["input_perturbation"] == 0.1
    rc = main(["train", "mixture-flow-ip", "--set", "steps=1", f"output_dir={tmp_path / 'r'}",
               "method.ip_target=sigma", "--no-progress"])
    assert rc == 2
    assert "ip_target must be one of ('eps', 'x0')" in capsys.readouterr().err
