"""Shortcut models: t <-> sigma conversion, sampler, target builder, batch allocation, EMA wiring."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastgen.core.analytic import GaussianMixtureDenoiser
from fastgen.core.solvers import euler
from fastgen.data.toy import ring_mixture
from fastgen.samplers.shortcut import (
    ShortcutDenoiser,
    check_num_steps,
    flow_velocity,
    shortcut_sample,
    shortcut_schedule,
    shortcut_t_to_sigma,
    sigma_to_shortcut_t,
)
from fastgen.train.shortcut import ShortcutMethod, ShortcutNet, assign_levels, bootstrap_target


class ExactGaussianShortcut(nn.Module):
    """Exact shortcut of N(mu, c^2 I) data: s*(x, t, d) = (Phi_{t->t+d}(x) - x) / d (card section 7)."""

    def __init__(self, mu: torch.Tensor, c: float, max_steps: int = 128) -> None:
        super().__init__()
        self.mu = mu.double()
        self.c = c
        self.max_steps = max_steps

    def sig(self, t: torch.Tensor) -> torch.Tensor:
        return ((1 - t) ** 2 + t**2 * self.c**2).sqrt()

    def flow_map(self, x: torch.Tensor, t: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        t, t2 = t[:, None], t2[:, None]
        return t2 * self.mu + self.sig(t2) / self.sig(t) * (x - t * self.mu)

    def forward(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, **_: object) -> torch.Tensor:
        return (self.flow_map(x, t, t + d) - x) / d[:, None]

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Instantaneous velocity E[x1 - x0 | x_t] (rectified-flow form of card section 2)."""
        t = t[:, None]
        v_t = (1 - t) ** 2 + t**2 * self.c**2
        e1 = self.mu + t * self.c**2 * (x - t * self.mu) / v_t
        e0 = (1 - t) * (x - t * self.mu) / v_t
        return e1 - e0


def test_t_sigma_conversion_roundtrip_and_ends():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    s = shortcut_t_to_sigma(t)
    assert math.isinf(float(s[0])) and float(s[-1]) == 0.0
    assert torch.allclose(s[1:4], torch.tensor([3.0, 1.0, 1 / 3], dtype=torch.float64))
    assert torch.allclose(sigma_to_shortcut_t(s), t, atol=1e-15)
    with pytest.raises(ValueError, match="t must lie in"):
        shortcut_t_to_sigma(torch.tensor([1.5]))
    assert torch.equal(shortcut_schedule(4), torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("bad", [0, 3, 6, -2, 2.0])
def test_num_steps_must_be_power_of_two(bad):
    with pytest.raises(ValueError, match="num_steps"):
        check_num_steps(bad)
    with pytest.raises(ValueError, match="max_steps=8"):
        check_num_steps(16, max_steps=8)


def test_exact_shortcut_passes_bootstrap_identity():
    torch.manual_seed(0)
    model = ExactGaussianShortcut(torch.tensor([0.7, -0.4]), c=0.3)
    g = torch.Generator().manual_seed(1)
    for k in range(7):  # d = 1 ... 1/64
        d = torch.full((64,), 2.0**-k, dtype=torch.float64)
        t = torch.randint(0, 2**k, (64,), generator=g).double() * d
        x = torch.randn(64, 2, generator=g, dtype=torch.float64)
        exact = model(x, t, d)
        got = bootstrap_target(model, x, t, d, clip=None)
        assert torch.allclose(got, exact, atol=1e-6, rtol=0)
        # the +-4 clips are inactive here, so the clipped builder gives the same target
        if exact.abs().max() < 4:
            assert torch.allclose(bootstrap_target(model, x, t, d, clip=4.0), exact, atol=1e-6, rtol=0)


def test_bootstrap_target_hand_computed():
    """s(x, t, d) = x + t: x=1,t=0,d=1 -> v1=1, x'=1.5, v2=2, target 1.5; x=3.9 -> x' clipped to 4."""

    def model(x, t, d):
        return x + t[:, None]

    x = torch.tensor([[1.0], [3.9], [0.5]])
    t = torch.tensor([0.0, 0.0, 0.5])
    d = torch.tensor([1.0, 1.0, 0.5])
    got = bootstrap_target(model, x, t, d, clip=4.0)
    # row 3: v1 = 0.5 + 0.5 = 1, x' = 0.5 + 0.25 = 0.75, v2 = 0.75 + 0.75 = 1.5, target = 1.25
    assert torch.allclose(got[:, 0], torch.tensor([1.5, 4.0, 1.25]))
    no_clip = bootstrap_target(model, x, t, d, clip=None)
    # row 2 unclipped: v1 = 3.9, x' = 5.85, v2 = 6.35, target = 5.125
    assert torch.allclose(no_clip[:, 0], torch.tensor([1.5, 5.125, 1.25]))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 128])
def test_sampler_with_exact_shortcut_is_exact(n):
    mu, c = torch.tensor([1.0, -2.0]), 0.4
    model = ExactGaussianShortcut(mu, c)
    noise = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = shortcut_sample(model, noise, n)
    assert torch.allclose(out, mu.double() + c * noise, atol=1e-9)


def test_sampler_rejects_more_steps_than_model():
    model = ExactGaussianShortcut(torch.zeros(2), 1.0, max_steps=8)
    with pytest.raises(ValueError, match="max_steps"):
        shortcut_sample(model, torch.zeros(2, 2, dtype=torch.float64), 16)


def test_shortcut_denoiser_matches_exact_gmm_denoiser():
    mu, c = torch.tensor([0.5, -1.0]), 0.6
    exact = ExactGaussianShortcut(mu, c)

    def vel(x, t, d):
        return exact.velocity(x, t)

    den = ShortcutDenoiser(vel, d=1 / 128)
    ref = GaussianMixtureDenoiser(torch.ones(1), mu[None].double(), stds=torch.tensor([c]))
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    for sigma in (0.05, 0.5, 1.0, 7.0):
        assert torch.allclose(den(x, sigma), ref(x, sigma), atol=1e-10)
    # and the VE denoiser's flow velocity reproduces the exact velocity
    v = flow_velocity(ref)
    t = torch.full((50,), 0.3, dtype=torch.float64)
    assert torch.allclose(v(x, t, t), exact.velocity(x, t), atol=1e-10)


def test_fastgen_euler_on_shortcut_denoiser_equals_euler_in_t():
    """Euler in VE sigma on ShortcutDenoiser == x <- x + dt v (same t grid), starting at t = 1/4."""
    mu, c = torch.tensor([0.5, -1.0]), 0.6
    exact = ExactGaussianShortcut(mu, c)
    model = lambda x, t, d: exact.velocity(x, t)  # noqa: E731
    x_t = torch.randn(20, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    y = x_t.clone()
    for i in range(3):
        y = y + (ts[i + 1] - ts[i]) * model(y, ts[i].expand(20), None)
    x_ve = x_t / ts[0]
    out = euler(ShortcutDenoiser(model, d=0.25), x_ve, shortcut_t_to_sigma(ts))
    assert torch.allclose(out, y, atol=1e-10)


def _precision(x: torch.Tensor, means: torch.Tensor, std: float) -> float:
    return float((torch.cdist(x.double(), means).min(1).values < 3 * std).double().mean())


def test_exact_flow_velocity_reproduces_euler_calibration_table():
    """Card testbeds section 6: 1 step collapses to the mean, 4 steps 0.89, 8 steps 0.97 (+-0.03)."""
    gmm = ring_mixture()
    v = flow_velocity(gmm.denoiser())
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = shortcut_sample(v, noise, 1)
    assert float(one.std(0).max()) < 1e-3 and _precision(one, gmm.means, 0.15) == 0.0
    assert abs(_precision(shortcut_sample(v, noise, 4), gmm.means, 0.15) - 0.89) < 0.03
    assert abs(_precision(shortcut_sample(v, noise, 8), gmm.means, 0.15) - 0.97) < 0.03


def test_shortcut_net_d_input_convention():
    seen = {}

    class Backbone(nn.Module):
        def forward(self, x, t, d=None, class_labels=None):
            seen["d"], seen["t"] = d, t
            return x

    net = ShortcutNet(Backbone(), max_steps=128)
    d = torch.tensor([1.0, 0.5, 1 / 64, 1 / 128])
    net(torch.zeros(4, 2), torch.tensor([0.0, 0.5, 0.25, 0.99]), d)
    assert torch.allclose(seen["d"], torch.tensor([0.0, 1 / 7, 6 / 7, 1.0]))
    assert torch.equal(seen["t"], torch.tensor([0.0, 0.5, 0.25, 0.99]))  # t enters raw


def test_level_allocation_chunks_and_guard():
    k = assign_levels(32, 7)
    counts = torch.bincount(k, minlength=7)
    assert counts.tolist() == [8, 4, 4, 4, 4, 4, 4]  # leftovers (32 - 28) go to d = 1
    assert k[:4].eq(6).all() and k[4:8].eq(5).all()  # descending chunks: smallest d first
    # B_b = 4 < 7 would leave every chunk empty: round-robin instead, rotating with the step
    seen = set()
    for step in range(7):
        kk = assign_levels(4, 7, step)
        assert len(set(kk.tolist())) == 4
        seen |= set(kk.tolist())
    assert seen == set(range(7))
    with pytest.raises(ValueError, match="batch_size"):
        assign_levels(4, 7, strict=True)


class TinyBackbone(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 64, num_classes: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim + 2, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, d=None, class_labels=None):
        h = self.inp(torch.cat([x, t[:, None].to(x.dtype), d[:, None].to(x.dtype)], 1))
        if self.emb is not None and class_labels is not None:
            h = h + self.emb(class_labels)
        return self.body(h)


def test_batch_times_on_grids_and_labels():
    torch.manual_seed(0)
    method = ShortcutMethod(ShortcutNet(TinyBackbone(num_classes=8), 128), num_classes=8, label_dropout=0.5)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 8, (256,), generator=g)
    inp = method.make_batch(torch.randn(256, 2, generator=g), labels, 0, g)
    boot = inp["is_boot"]
    assert int(boot.sum()) == 32
    t, d = inp["t"].double(), inp["d"].double()
    cells = t / d
    assert torch.allclose(cells, cells.round(), atol=1e-9) and (t[boot] + d[boot] <= 1 + 1e-12).all()
    assert torch.equal(d[~boot], torch.full((224,), 1 / 128, dtype=torch.float64))
    assert (t[~boot] < 1).all() and torch.allclose(t[~boot] * 128, (t[~boot] * 128).round())
    assert torch.equal(torch.bincount(inp["level"], minlength=7), torch.tensor([8, 4, 4, 4, 4, 4, 4]))
    # no label dropout on bootstrap rows; about half the flow rows are dropped to the null label 8
    assert torch.equal(inp["labels"][boot], labels[boot])
    frac = float((inp["labels"][~boot] == 8).double().mean())
    assert 0.35 < frac < 0.65


def test_ema_wiring_target_uses_ema_not_online_and_has_no_grad():
    torch.manual_seed(0)
    method = ShortcutMethod(ShortcutNet(TinyBackbone(), 8), bootstrap_every=1)
    method.update_target()
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def target():
        return method.make_batch(x1, None, 0, torch.Generator().manual_seed(5))["target"]

    base = target()
    assert not base.requires_grad
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.5)
    assert torch.equal(target(), base)  # online weights do not enter the target
    with torch.no_grad():
        next(method.target_net.parameters()).add_(0.5)
    assert not torch.allclose(target(), base)  # EMA weights do
    # one step: loss has grad only into the online model, never into the target network
    loss = method.step({"x": x1}, 1, torch.Generator().manual_seed(0))["main"]
    loss.backward()
    assert all(p.grad is None for p in method.target_net.parameters())
    assert all(p.grad is not None for p in method.model.parameters())


def test_ema_update_and_state_roundtrip():
    torch.manual_seed(0)
    method = ShortcutMethod(ShortcutNet(TinyBackbone(), 8), ema_decay=0.9, ema_warmup=False)
    assert method.update_target() == 0.0  # first update copies the online weights
    p_on = next(method.model.parameters())
    p_t = next(method.target_net.parameters())
    with torch.no_grad():
        p_on.add_(1.0)
    before = p_t.detach().clone()
    assert method.update_target() == 0.9
    assert torch.allclose(p_t, before + 0.1 * 1.0, atol=1e-6)
    state = method.state_dict()
    other = ShortcutMethod(ShortcutNet(TinyBackbone(), 8))
    other.load_state_dict(state)
    assert other.ema_updates == 2 and torch.equal(next(other.target_net.parameters()), p_t)


def test_bad_arguments_raise():
    net = ShortcutNet(TinyBackbone(), 8)
    with pytest.raises(ValueError, match="label_dropout"):
        ShortcutMethod(net, label_dropout=1.5)
    with pytest.raises(ValueError, match="bootstrap_every"):
        ShortcutMethod(net, bootstrap_every=-1)
    with pytest.raises(ValueError, match="max_steps"):
        ShortcutMethod(TinyBackbone())
    with pytest.raises(ValueError, match="max_steps"):
        ShortcutNet(TinyBackbone(), max_steps=12)


def _train(bootstrap_every: int, steps: int, seed: int = 0) -> ShortcutNet:
    torch.manual_seed(seed)
    net = ShortcutNet(TinyBackbone(hidden=64), max_steps=16)
    method = ShortcutMethod(net, bootstrap_every=bootstrap_every, ema_decay=0.9)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([1.0, -0.5])
    for i in range(steps):
        x1 = mu + 0.5 * torch.randn(256, 2, generator=g)
        loss = method.step({"x": x1}, i, g)["main"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net


@pytest.mark.slow
def test_gaussian_one_step_shortcut_vs_flow_matching():
    """Card section 7.4: 1-step shortcut samples have mean ~ mu and std ~ s; flow matching collapses.

    M = 16 (the base level must be fine enough for its Euler error to be small; at M = 8 the 8-step
    Euler std is 0.39 and the bootstrap inherits it). Measured: 1-step std 0.485, mean error < 0.01.
    """
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(9))
    sc = _train(bootstrap_every=2, steps=4000)
    fm = _train(bootstrap_every=0, steps=1000)
    with torch.no_grad():
        x_sc = shortcut_sample(sc, noise, 1)
        x_fm = shortcut_sample(fm, noise, 1)
    mu = torch.tensor([1.0, -0.5])
    assert torch.allclose(x_sc.mean(0), mu, atol=0.1)
    assert ((x_sc.std(0) - 0.5).abs() < 0.05).all()  # within 10% of s = 0.5
    assert (x_fm.std(0) < 0.2).all()  # flow matching at 1 step: mass pulled to the mean (0 if exact)


class CountingVelocity(nn.Module):
    """s(x, t, d, class_labels) = x + label (null label 8 -> 0); counts calls and their batch sizes."""

    max_steps = 128

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.sizes: list[int] = []

    def forward(self, x, t, d, class_labels=None):
        self.sizes.append(x.shape[0])
        lab = torch.zeros(x.shape[0]) if class_labels is None else class_labels.float() % 8
        return self.w * x + lab[:, None]


def test_bootstrap_cfg_applies_only_to_the_smallest_level_and_counts_calls():
    model = CountingVelocity()
    method = ShortcutMethod(model, num_classes=8, bootstrap_cfg_scale=1.5, clip=None)
    target_net = method.target_net
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(256, 2, generator=g)
    labels = (torch.arange(256) % 7) + 1  # never the null label
    inp = method.make_batch(x1, labels, 0, g)
    # 2 half-step calls on the 32 bootstrap rows + 2 unconditional calls on the 4 rows of level 6 (d = 1/64)
    assert target_net.sizes == [32, 4, 32, 4]
    boot, lev = inp["is_boot"], inp["level"]
    x_t, t, d = inp["x_t"][boot], inp["t"][boot], inp["d"][boot]
    plain = bootstrap_target(target_net, x_t, t, d, clip=None, class_labels=labels[:32])
    guided = lev == 6
    assert torch.allclose(inp["target"][:32][~guided], plain[~guided])
    # v = v_u + w (v_c - v_u) with v_c = x + y, v_u = x (null label): both half steps get x + 1.5 y
    y = labels[:32][guided].float()[:, None]
    xg, hg = x_t[guided], d[guided][:, None] / 2
    v1 = xg + 1.5 * y
    v2 = (xg + hg * v1) + 1.5 * y
    assert torch.allclose(inp["target"][:32][guided], (v1 + v2) / 2, atol=1e-6)


def test_trainer_runs_the_mixture_shortcut_config(tmp_path):
    from fastgen.train import Trainer, load_config

    cfg = load_config("fastgen/configs/train/mixture-shortcut.yaml",
                      ["steps=3", "batch_size=64", f"output_dir={tmp_path}", "progress=false", "log_every=1"])
    trainer = Trainer(cfg)
    recs = trainer.train()
    assert len(recs) == 3 and all(math.isfinite(r["loss/main"]) for r in recs)
    assert trainer.method.ema_updates == 3  # once per optimizer step
    assert "target_net" in trainer.method.frozen()
    # the method's state (the bootstrap-target EMA) round-trips through the checkpoint
    resumed = Trainer(load_config("fastgen/configs/train/mixture-shortcut.yaml",
                                  ["steps=3", "batch_size=64", f"output_dir={tmp_path}", "progress=false"]))
    resumed._maybe_resume()
    assert resumed.method.ema_updates == 3
    for a, b in zip(resumed.method.target_net.parameters(), trainer.method.target_net.parameters()):
        assert torch.equal(a, b)


def test_zoo_roundtrip_of_a_shortcut_model(tmp_path):
    from fastgen.models.nets import build_network
    from fastgen.models.zoo import export_model, load

    torch.manual_seed(0)
    spec = {"kind": "mlp", "in_dim": 2, "width": 16, "depth": 1, "num_classes": 3, "scalars": ["d"]}
    net = build_network(**spec)
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    export_model(net, "toy-shortcut", spec, {"type": "shortcut", "max_steps": 8},
                 weights_dir=tmp_path, dtype=torch.float32)
    den = load("toy-shortcut", weights_dir=tmp_path)
    assert isinstance(den, ShortcutDenoiser) and den.d == 1 / 8 and den.model.max_steps == 8
    x = torch.randn(5, 2)
    y = torch.tensor([0, 1, 2, 0, 1])
    ref = ShortcutNet(net, 8)
    t, d = torch.full((5,), 0.25), torch.full((5,), 0.5)
    assert torch.allclose(den.model(x, t, d, class_labels=y), ref(x, t, d, class_labels=y))
    out = shortcut_sample(den.model, x, 2, class_labels=y)
    assert torch.allclose(out, shortcut_sample(ref, x, 2, class_labels=y))
