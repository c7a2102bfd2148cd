"""BOSS straightening (fastgen.distill.boss): the fine-tune target lands on the teacher state, teacher states
are the exact ODE map, the loss is BOSS's flow-velocity error, the DP steps, a fine-tune that beats the DP
schedule alone on the exact mixture, resume, bad configs, and digits-flow through the registry."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.core.denoiser import RectifiedFlowDenoiser
from fastgen.core.solvers import euler, euler_step
from fastgen.distill.boss import BOSS, BOSSConfig, boss_loss, boss_target, choose_steps, teacher_states
from fastgen.train import Trainer
from tests._fewstep_toys import CorrectedDenoiser, data_free_config, ring_exact


def _gauss(c: float = 0.7):
    from fastgen.core.analytic import GaussianMixtureDenoiser

    return GaussianMixtureDenoiser(torch.ones(1), torch.zeros(1, 2), stds=torch.tensor([c]))


def test_teacher_states_are_the_exact_ode_map_and_the_target_lands_on_them():
    """Data N(0, c^2 I): the probability-flow ODE map is x(s) = x(s0) sqrt((c^2 + s^2)/(c^2 + s0^2))."""
    c = 0.7
    den = _gauss(c)
    sig = [80.0, 5.0, 0.8, 0.05, 0.0]
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    states = teacher_states(den, z, sig, {}, rtol=1e-9)
    for i, s in enumerate(sig):
        exact = z * 80.0 * math.sqrt((c**2 + s**2) / (c**2 + 80.0**2))
        torch.testing.assert_close(states[i], exact, rtol=1e-6, atol=1e-6)
    for m in range(len(sig) - 1):  # one Euler step with the target denoiser output lands on the teacher state
        d_star = boss_target(states[m], states[m + 1], sig[m], sig[m + 1])
        torch.testing.assert_close(euler_step(states[m], d_star, sig[m], sig[m + 1]), states[m + 1],
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(boss_target(states[3], states[4], 0.05, 0.0), states[4], rtol=0, atol=0)


def test_loss_is_the_rectified_flow_velocity_error():
    """For a flow net v(x_t, t): boss_loss of the VE Euler step == |v - (x_t' - x_t)/(t' - t)|^2 in flow coordinates."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    net = lambda x_t, t, **c: lin(torch.cat([x_t, t[:, None]], 1))  # noqa: E731
    den = RectifiedFlowDenoiser(net)
    x = torch.randn(16, 2, dtype=torch.float64) * 4
    x_next = torch.randn(16, 2, dtype=torch.float64)
    s, s_next = 3.0, 0.5
    pred = euler_step(x, den(x, s), s, s_next)
    got = boss_loss(pred, x_next, torch.full((16,), s), torch.full((16,), s_next))
    t, tn = 1 / (1 + s), 1 / (1 + s_next)
    v = net(t * x, torch.full((16,), t, dtype=torch.float64))
    v_star = (tn * x_next - t * x) / (tn - t)
    torch.testing.assert_close(got, ((v - v_star) ** 2).mean(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tn * pred, t * x + (tn - t) * v, rtol=1e-12, atol=1e-12)  # VE Euler = flow Euler


def test_dp_steps_are_a_subset_of_the_grid_ending_in_zero():
    den = ring_exact().double()
    noise = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sched = choose_steps(den, noise, 3, grid_size=12, sigma_min=0.002, sigma_max=80.0)
    assert len(sched.sigmas) == 4 and float(sched.sigmas[-1]) == 0 and sched.meta["coeff"] == 1.0
    assert sched.solver == "euler" and sched.meta["grid_indices"][0] == 0


def _method(student, **kw) -> BOSS:
    cfg = BOSSConfig(**{"nfe": 3, "grid_size": 24, "dp_samples": 64, "pool_size": 256, "sample_shape": (2,), **kw})
    return BOSS(ring_exact(), student, cfg, sigma_range=(0.002, 80.0))


def _rmse(m: BOSS) -> float:
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(99))
    tea = teacher_states(ring_exact(), z, m.sigmas, {})[-1]
    with torch.no_grad():
        return float(((m.generator()(z) - tea) ** 2).sum(1).mean().sqrt())


def test_straightening_beats_the_dp_schedule_alone(tmp_path):
    """The student starts at the exact denoiser (so iteration 0 is 'DP schedule alone'); a small fine-tune must
    cut the 3-step Euler RMSE to the exact ODE endpoint (held-out noises) to <= 0.65x (0.82 -> ~0.47)."""
    m = _method(CorrectedDenoiser(ring_exact()))
    before = _rmse(m)
    with torch.no_grad():
        z = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(m.generator()(z), euler(ring_exact(), z * 80.0, torch.tensor(m.sigmas)))
    Trainer(data_free_config(tmp_path, 200, batch=128, lr=1e-2), method=m).train()
    after = _rmse(m)
    assert after <= 0.65 * before, (before, after)


def test_resume_is_bit_exact(tmp_path):
    def run(out, steps):
        m = _method(CorrectedDenoiser(ring_exact()), dp_samples=16, pool_size=64, grid_size=10)
        Trainer(data_free_config(out, steps, checkpoint_every=2), method=m).train()
        return m

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    for (k, a), (_, b) in zip(full.student.state_dict().items(), resumed.student.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="method.nfe"):
        BOSSConfig(nfe=8, grid_size=4)
    with pytest.raises(ValueError, match="method.metric"):
        BOSSConfig(metric="lpips")
    with pytest.raises(ValueError, match="must end in 0"):
        BOSSConfig(sigmas=[80.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        BOSSConfig(sigmas=[80.0, 1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="method.pool_size"):
        BOSSConfig(pool_size=0)
    with pytest.raises(ValueError, match="unknown boss method option"):
        BOSSConfig.from_dict({"nfes": 4})


def test_digits_flow_through_the_registry_and_load_model(tmp_path):
    import fastgen.distill  # noqa: F401  (registers boss)
    from fastgen.models import load_model
    from fastgen.train.config import config_from_dict
    from fastgen.train.method import build_method

    cfg = config_from_dict({"name": "t", "output_dir": str(tmp_path), "steps": 1, "batch_size": 4, "progress": False,
                            "data": {"name": "none", "num_samples": 16},
                            "method": {"name": "boss", "teacher": "digits-flow", "nfe": 2, "grid_size": 8,
                                       "dp_samples": 8, "pool_size": 8, "rtol": 1e-3}})
    m = build_method(cfg)
    out = m.step({"index": torch.arange(4)}, 0, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["main"]) and len(m.sigmas) == 3 and m.sigmas[-1] == 0
    m.save_student(m.generator(), tmp_path / "student")
    loaded = load_model(tmp_path)
    assert loaded.kind == "student" and loaded.generator.nfe == 2 and loaded.conditioning == "class"
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.generator(z, torch.arange(2)), m.generator()(z, torch.arange(2)),
                                   rtol=0, atol=0)
