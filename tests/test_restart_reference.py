"""Restart presets and the A1111 rule against small ports of the reference samplers (float64).

The ports below follow the official EDM-based Restart sampler (Xu et al. 2023: main Heun process with
S_churn = 0, in-segment churn ``restart_gamma`` on [S_min, S_max]) and AUTOMATIC1111's ``sample_restart``
(automatic segment, t_min and t_max snapped to the main grid). They are written here from the published
algorithms; only noise is drawn where its coefficient is non-zero, in the order both samplers use it.
"""

from __future__ import annotations

import pytest
import torch

from fastgen.core.analytic import GaussianMixtureDenoiser
from fastgen.samplers import restart_sample
from fastgen.samplers.restart import PRESETS, auto_plan, get_preset


def _mixture() -> GaussianMixtureDenoiser:
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.2]], dtype=torch.float64)
    return GaussianMixtureDenoiser(torch.tensor([0.3, 0.3, 0.4]), means, stds=torch.tensor([0.2, 0.3, 0.25]))


def _randn(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=gen, dtype=torch.float32).double()


def _edm_steps(t_min: float, t_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return (t_max ** (1 / rho) + i / (n - 1) * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho


def _heun(net, x, t_cur, t_next, gamma, s_noise, gen, second_order):
    """One official step: churn to t_hat = t (1 + gamma), Euler, then the 2nd-order correction."""
    t_hat = t_cur + gamma * t_cur
    if gamma > 0:
        x = x + (t_hat**2 - t_cur**2).sqrt() * s_noise * _randn(x, gen)
    d_cur = (x - net(x, t_hat)) / t_hat
    x_next = x + (t_next - t_hat) * d_cur
    if second_order:
        d_prime = (x_next - net(x_next, t_next)) / t_next
        x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def official_restart(net, latents, gen, num_steps, restart_list, s_noise=1.0, restart_gamma=0.05,
                     s_min=0.01, s_max=1.0, sigma_min=0.002, sigma_max=80.0):
    """Port of the official ``edm_sampler`` with ``restart_info`` (segments: [N_R, K, t_min, t_max])."""
    t_steps = torch.cat([_edm_steps(sigma_min, sigma_max, num_steps), torch.zeros(1, dtype=torch.float64)])
    keyed = {int(torch.argmin((t_steps - v[2]).abs())): v for v in restart_list}
    x_next = latents.double() * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_next = _heun(net, x_next, t_cur, t_next, 0.0, s_noise, gen, i < num_steps - 1)
        if i + 1 in keyed:
            n_r, k, _, t_max = keyed[i + 1]
            new_t = _edm_steps(float(t_steps[i + 1]), t_max, n_r)
            for _ in range(k):
                x_next = x_next + _randn(x_next, gen) * (new_t[0] ** 2 - new_t[-1] ** 2).sqrt() * s_noise
                for tc, tn in zip(new_t[:-1], new_t[1:]):
                    gamma = restart_gamma if s_min <= tc <= s_max else 0.0
                    x_next = _heun(net, x_next, tc, tn, gamma, s_noise, gen, True)
    return x_next


def a1111_restart(model, x, sigmas, gen, s_noise=1.0):
    """Port of A1111's ``sample_restart`` with the automatic segment (restart_list=None)."""
    steps = sigmas.shape[0] - 1
    restart_list = {}
    if steps >= 20:
        restart_steps, restart_times = (9, 1) if steps < 36 else (steps // 4, 2)
        sigmas = torch.cat([_edm_steps(float(sigmas[-2]), float(sigmas[0]), steps - restart_steps * restart_times),
                            torch.zeros(1, dtype=torch.float64)])
        restart_list = {0.1: [restart_steps + 1, restart_times, 2.0]}
    restart_list = {int(torch.argmin((sigmas - key).abs())): v for key, v in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            n_r, times, t_max = restart_list[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin((sigmas - t_max).abs()))
            if max_idx < min_idx:
                sr = _edm_steps(float(sigmas[min_idx]), float(sigmas[max_idx]), n_r)
                for _ in range(times):
                    step_list.extend(zip(sr[:-1], sr[1:]))
    last = None
    for old, new in step_list:
        if last is None:
            last = old
        elif last < old:
            x = x + _randn(x, gen) * s_noise * (old**2 - last**2) ** 0.5
        d = (x - model(x, old)) / old
        x2 = x + d * (new - old)
        if new != 0:
            d2 = (x2 - model(x2, new)) / new
            x2 = x + (d + d2) / 2 * (new - old)
        x, last = x2, new
    return x


CIFAR = [name for name in PRESETS if name.startswith("cifar10")]


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_presets_equal_the_official_configuration(name):
    preset = get_preset(name)
    assert (preset.churn, preset.churn_tmin, preset.churn_tmax, preset.s_noise) == (0.05, 0.01, 1.0, 1.0)
    den = _mixture()
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    segs = [[s.n_steps, s.k, s.t_min, s.t_max] for s in preset.segments]
    ref = official_restart(den, z, torch.Generator().manual_seed(7), preset.n_main, segs)
    ours = restart_sample(den, z * 80.0, plan=preset.plan(), generator=torch.Generator().manual_seed(7))
    assert (ours - ref).abs().max().item() < 1e-12
    # churn matters here: without it the sample differs (the official configuration is not churn-free)
    plain = official_restart(den, z, torch.Generator().manual_seed(7), preset.n_main, segs, restart_gamma=0.0)
    assert (plain - ref).abs().max().item() > 1e-4


@pytest.mark.parametrize("steps,t_max", [(20, 2.2327), (30, 2.2327), (40, 1.9914), (19, None)])
def test_a1111_rule_equals_a1111_sampler(steps, t_max):
    lo, hi = 0.0292, 14.6146
    plan = auto_plan(steps, lo, hi)
    ups = [float(b) for b, j in zip(plan.sigmas[1:], plan.jumps) if j]
    assert (round(max(ups), 4) if ups else None) == t_max
    den = _mixture()
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigmas = torch.cat([_edm_steps(lo, hi, steps), torch.zeros(1, dtype=torch.float64)])
    ref = a1111_restart(den, z * hi, sigmas, torch.Generator().manual_seed(11))
    ours = restart_sample(den, z * hi, plan=plan, generator=torch.Generator().manual_seed(11))
    assert (ours - ref).abs().max().item() < 1e-12
