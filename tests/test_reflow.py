"""Reflow (2-rectified flow) and its distillation: the coupling is the ODE map (closed form on a Gaussian,
torchdiffeq in rectified-flow time on a mixture), straightness in closed form, the loss and its t draws,
straightening on the ring mixture through the Trainer, pair caching, exact resume, and bad configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastgen.core.analytic import GaussianMixtureDenoiser
from fastgen.core.solvers import euler
from fastgen.train import Trainer
from fastgen.train.config import config_from_dict
from fastgen.train.method import build_method
from fastgen.train.reflow import PAIRS_FILE, ReflowMethod, reflow_loss
from fastgen.train.reflow_pairs import RF_SIGMA_MAX, generate_pairs, rf_uniform_sigmas, rf_velocity, straightness

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
C = 0.4  # data N(MU, C^2 I)
T0 = 1 / (1 + RF_SIGMA_MAX)  # rectified-flow time of the start sigma_max


def gaussian() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(torch.ones(1), MU[None], stds=torch.tensor([C]))


def s_of(t):
    """Std of the rectified-flow marginal N(t MU, s(t)^2 I) between N(0, I) and N(MU, C^2 I)."""
    return ((1 - t) ** 2 + (t * C) ** 2) ** 0.5


def exact_endpoint(z0: torch.Tensor) -> torch.Tensor:
    """The exact ODE map from x_{t0} = (1 - t0) z0: paths x_t = t MU + s(t) u, so z1 = MU + C u."""
    u = ((1 - T0) * z0 - T0 * MU) / s_of(T0)
    return MU + C * u


def test_rf_velocity_of_the_exact_gaussian_denoiser_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64) * 2
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    v = rf_velocity(gaussian(), x, t)
    tt = t[:, None]
    ds = (tt * C**2 - (1 - tt)) / s_of(tt) ** 2  # s'(t) / s(t)
    # (the mixture denoiser holds some float32 intermediates: agreement to the float32 bound)
    assert torch.allclose(v, MU + ds * (x - tt * MU), rtol=1e-6, atol=1e-6)


def test_coupling_is_the_exact_ode_map_on_a_gaussian():
    z0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_endpoint(z0)
    den = gaussian()
    ref = generate_pairs(den, 256, (2,), solver="dopri5", seed=1, dtype=torch.float64)
    assert torch.equal(ref["z0"], z0)
    assert torch.allclose(ref["z1"], exact, atol=2e-4, rtol=0)
    heun = generate_pairs(den, 256, (2,), solver="heun", steps=64, seed=1, dtype=torch.float64)
    assert torch.allclose(heun["z1"], exact, atol=2e-3, rtol=0)
    # one Euler step of the exact 1-rectified flow lands on the data mean (card section 2)
    one = euler(den, z0 * RF_SIGMA_MAX, rf_uniform_sigmas(1))
    assert torch.allclose(one, MU.expand_as(one), atol=2e-3, rtol=0)


def test_coupling_matches_torchdiffeq_in_rectified_flow_time_on_the_ring_mixture():
    from torchdiffeq import odeint

    from fastgen.data.toy import ring_mixture

    mix = ring_mixture()
    den = GaussianMixtureDenoiser(mix.weights, mix.means, stds=mix.stds)
    pairs = generate_pairs(den, 64, (2,), solver="dopri5", seed=2, dtype=torch.float64)
    x = (1 - T0) * pairs["z0"]

    def rhs(t, x):
        return rf_velocity(den, x, t.expand(x.shape[0]))

    ts = torch.tensor([T0, 1 - 1e-4], dtype=torch.float64)
    end = odeint(rhs, x, ts, rtol=1e-8, atol=1e-8)[-1]
    end = end + 1e-4 * rhs(ts[-1], end)  # the last 1e-4 of time, one Euler step
    assert torch.allclose(pairs["z1"], end, atol=5e-3, rtol=0)


def test_pairs_are_drawn_without_gradients_in_eval_mode():
    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x, sigma, **cond):
            self.seen.append((torch.is_grad_enabled(), self.training, cond.get("class_labels")))
            return torch.zeros_like(x)

    spy = Spy().train()
    pairs = generate_pairs(spy, 10, (3,), solver="euler", steps=2, num_classes=4, batch_size=4)
    assert spy.training  # restored
    assert all(not grad and not train for grad, train, _ in spy.seen)
    assert torch.equal(pairs["label"], torch.arange(10) % 4)
    assert torch.equal(torch.cat([c for *_, c in spy.seen[::2]]), torch.arange(10) % 4)
    # the noises come from one stream: they do not depend on the batch size
    assert torch.equal(pairs["z0"], generate_pairs(spy, 10, (3,), solver="euler", steps=1, batch_size=7)["z0"])


def test_straightness_closed_form_on_the_gaussian_and_zero_for_the_straight_coupling():
    z0 = torch.randn(512, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = straightness(gaussian(), z0, steps=400)
    # exact: (Z_1 - Z_0)/(1 - t0) - dZ/dt = ((C - s(t0))/(1 - t0) - s'(t)) u, averaged over t in [t0, 1]
    u = (((1 - T0) * z0 - T0 * MU) / s_of(T0)).numpy()
    t = np.linspace(T0, 1, 20001)
    ds = (t * C**2 - (1 - t)) / s_of(t)
    b = (C - s_of(T0)) / (1 - T0) - ds  # (T,)
    per_t = b**2 * (u**2).sum(1).mean()
    exact = float(np.trapezoid(per_t, t) / (1 - T0))
    assert got["S"] == pytest.approx(exact, rel=2e-2)
    assert got["S"] > 0.1

    class StraightGaussian(nn.Module):  # the 2-rectified flow of the Gaussian: x_t = t MU + (1 - t + tC) z0
        def forward(self, x, sigma, **_):
            t = (1 / (1 + sigma)).reshape(-1, 1)
            xt = t * x
            v = MU + (C - 1) * (xt - t * MU) / (1 - t + t * C)
            return xt + (1 - t) * v

    straight = straightness(StraightGaussian(), z0, steps=50)
    assert straight["S"] < 1e-20
    one = euler(StraightGaussian(), z0 * RF_SIGMA_MAX, rf_uniform_sigmas(1))
    assert torch.allclose(one, straight["z1"], atol=1e-12, rtol=0)


class TimeSpy(nn.Module):
    num_classes = 0

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.ts = []

    def forward(self, x, t, class_labels=None):
        self.ts.append(t.detach().clone())
        return self.w * x + t[:, None]


def _pairs(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"z0": torch.randn(n, 2, generator=g), "z1": torch.randn(n, 2, generator=g)}


def test_reflow_loss_target_and_time_draws():
    pairs = _pairs()
    net = TimeSpy()
    m = ReflowMethod(net, pairs)
    idx = torch.tensor([3, 0, 7, 7, 31, 12])
    loss = m.step({"index": idx}, 0, torch.Generator().manual_seed(4))["main"]
    t = 1e-3 + (1 - 1e-3) * torch.rand(6, generator=torch.Generator().manual_seed(4))
    z0, z1 = pairs["z0"][idx], pairs["z1"][idx]
    xt = t[:, None] * z1 + (1 - t[:, None]) * z0
    expected = ((0.7 * xt + t[:, None] - (z1 - z0)) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    # one-step distillation trains at t = eps only; k-step on the k-point grid
    for k, grid in ((1, {1e-3}), (4, {1e-3 + i / 4 * (1 - 1e-3) for i in range(4)})):
        net.ts.clear()
        ReflowMethod(net, pairs, distill_steps=k).step({"index": torch.arange(32)}, 0, torch.Generator())
        seen = {round(float(v), 6) for v in net.ts[0]}
        assert seen <= {round(v, 6) for v in grid} and len(seen) == len(grid)
    # pseudo-Huber: sqrt(|r|^2 + c^2) - c per row, c = 0.00054 sqrt(2)
    r = (0.7 * xt + t[:, None] - (z1 - z0)).double()
    c = 0.00054 * math.sqrt(2)
    ph = reflow_loss(TimeSpy(), z0, z1, t, loss="pseudo_huber")
    assert float(ph.detach()) == pytest.approx(float(((r**2).sum(1) + c * c).sqrt().sub(c).mean()), rel=1e-6)


def _mix_cfg(tmp_path, **method):
    m = {"name": "reflow", "teacher": "ring-mixture", "init": "scratch", "num_pairs": 8000, "pair_solver": "heun",
         "pair_steps": 32, "sample_shape": [2]}
    m.update(method)
    return {
        "name": "mix-reflow", "output_dir": str(tmp_path / "run"), "seed": 0, "steps": 600, "batch_size": 512,
        "log_every": 100, "checkpoint_every": 1000, "progress": False, "num_threads": 1,
        "data": {"name": "none", "num_samples": m["num_pairs"]},
        "network": {"kind": "mlp", "in_dim": 2, "width": 128, "depth": 3, "num_classes": 0},
        "method": m,
        "optim": {"lr": 0.002, "warmup_steps": 100, "decay_start": 300, "decay_end": 600, "final_lr_ratio": 0.05},
        "ema": {"decay": 0.99},
    }


def test_reflow_straightens_the_ring_mixture_flow(tmp_path):
    """Card toy (smaller: 600 steps, 8000 pairs): exact 1-RF of the 8-mode ring -> 2-RF MLP on its ODE pairs."""
    from fastgen.data.toy import ring_mixture

    tr = Trainer(config_from_dict(_mix_cfg(tmp_path)))
    tr.train()
    mix = ring_mixture()
    exact = GaussianMixtureDenoiser(mix.weights, mix.means, stds=mix.stds)
    z0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(9))
    s1 = straightness(exact, z0)
    two = tr.method.sampling_denoiser(tr.ema_network())
    s2 = straightness(two, z0)
    assert s2["S"] < 0.1 * s1["S"]
    one2 = euler(two, z0 * RF_SIGMA_MAX, rf_uniform_sigmas(1))
    one1 = euler(exact, z0 * RF_SIGMA_MAX, rf_uniform_sigmas(1))
    err2 = float(((one2 - s2["z1"]) ** 2).sum(1).mean())
    err1 = float(((one1 - s1["z1"]) ** 2).sum(1).mean())
    assert err2 < err1 / 20
    d = torch.cdist(one2.double(), mix.means)
    near = d.min(1).values < 3 * 0.15
    assert float(near.float().mean()) > 0.5 and len(set(d.argmin(1)[near].tolist())) >= 6
    near1 = torch.cdist(one1.double(), mix.means).min(1).values < 3 * 0.15
    assert float(near1.float().mean()) < 0.05  # the 1-RF's one step lands near the data mean, on no mode


def test_pairs_cache_resume_exact_and_regeneration(tmp_path):
    cfg = _mix_cfg(tmp_path / "a", num_pairs=64, pair_steps=2)
    cfg.update(steps=6, batch_size=16, log_every=1, checkpoint_every=2)
    full = Trainer(config_from_dict(cfg))
    full.train()

    class Killed(Exception):
        pass

    def kill(tr, logs):
        if tr.step == 3:
            raise Killed

    cfg_b = {**cfg, "output_dir": str(tmp_path / "b" / "run")}
    with pytest.raises(Killed):
        Trainer(config_from_dict(cfg_b)).train(callback=kill)
    cached = tmp_path / "b" / "run" / PAIRS_FILE
    stamp = cached.stat().st_mtime_ns
    resumed = Trainer(config_from_dict(cfg_b))
    resumed.train()
    assert cached.stat().st_mtime_ns == stamp  # reused, not regenerated
    ref, out = full.state_tensors(), resumed.state_tensors()
    for k in ref:
        assert torch.equal(ref[k], out[k]), k
    # a different specification regenerates the file
    other = build_method(config_from_dict({**cfg_b, "method": {**cfg_b["method"], "pair_seed": 5}}))
    assert not torch.equal(other.pairs["z0"], resumed.method.pairs["z0"])
    assert cached.stat().st_mtime_ns != stamp


def test_pairs_of_a_run_folder_teacher_are_redrawn_when_its_weights_change(tmp_path):
    """A retrained run folder keeps its identity (config + sigma range): the cache also keys on its files."""
    import os

    from safetensors import safe_open

    teacher = _mix_cfg(tmp_path / "t", num_pairs=16, pair_steps=1)
    teacher.update(steps=2, batch_size=8, checkpoint_every=2)
    Trainer(config_from_dict(teacher)).train()
    cfg = _mix_cfg(tmp_path / "s", teacher=teacher["output_dir"], num_pairs=16, pair_steps=1)
    cached = tmp_path / "s" / "run" / PAIRS_FILE

    def spec() -> dict:
        with safe_open(str(cached), "pt") as f:
            return json.loads(f.metadata()["spec"])

    build_method(config_from_dict(cfg))
    before, stamp = spec(), cached.stat().st_mtime_ns
    build_method(config_from_dict(cfg))
    assert cached.stat().st_mtime_ns == stamp  # same files: reused
    w = next(Path(teacher["output_dir"]).rglob("*.safetensors"))
    st = w.stat()
    os.utime(w, (st.st_atime, st.st_mtime + 10))
    build_method(config_from_dict(cfg))
    after = spec()
    assert after["teacher"] == before["teacher"] and after["teacher_files"] != before["teacher_files"]
    assert cached.stat().st_mtime_ns != stamp


@pytest.mark.parametrize(
    "method, data, network, needle",
    [({"teacher": None}, None, None, "method.teacher must name"),
     ({}, {"name": "mixture"}, None, "reflow reads its pairs by index"),
     ({}, {"name": "none", "num_samples": 10}, None, "reflow reads its pairs by index"),
     ({"num_pairs": 0}, {"name": "none", "num_samples": 0}, None, "method.num_pairs must be an int >= 1"),
     ({"pair_schedule": "cosine"}, None, None, "pair_schedule must be one of ('rf_uniform', 'karras')"),
     ({"pair_solver": "rk4"}, None, None, "solver must be one of"),
     ({"loss": "lpips"}, None, None, "loss must be one of ('l2', 'pseudo_huber')"),
     ({"distill_steps": -1}, None, None, "distill_steps must be an int >= 0"),
     ({"init": "random"}, None, None, "method.init must be one of ('teacher', 'scratch')"),
     ({"init": "teacher"}, None, None, "init: teacher needs a rectified-flow teacher"),
     ({"teacher": "no-such-model"}, None, None, "no-such-model"),
     ({"sample_shape": [3]}, None, None, "method.sample_shape [3] differs"),
     ({"warp": 1}, None, None, "unknown reflow method option(s) ['warp']"),
     ({}, None, {"num_classes": 3}, "network.num_classes = 3 needs a teacher with 3 classes")],
)
def test_bad_configs_are_named(tmp_path, method, data, network, needle):
    cfg = _mix_cfg(tmp_path, num_pairs=16, pair_steps=1)
    cfg["data"]["num_samples"] = 16
    cfg["method"].update(method)
    if data is not None:
        cfg["data"] = data
    if network is not None:
        cfg["network"].update(network)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        build_method(config_from_dict(cfg))
    assert needle in str(err.value)


def test_shipped_reflow_configs_and_cli(tmp_path, capsys):
    from fastgen.cli import main
    from fastgen.commands._configs import config_names

    assert {"digits-reflow", "digits-reflow-distill", "mixture-reflow"} <= set(config_names("train"))
    rc = main(["train", "mixture-reflow", "--set", "steps=2", "batch_size=8", "method.num_pairs=16",
               "data.num_samples=16", "method.pair_steps=2", f"output_dir={tmp_path / 'r'}", "--no-progress"])
    assert rc == 0 and (tmp_path / "r" / PAIRS_FILE).is_file()
    rc = main(["train", "mixture-reflow", "--set", "steps=2", "method.loss=lpips", f"output_dir={tmp_path / 'q'}"])
    assert rc == 2 and "loss must be one of" in capsys.readouterr().err
