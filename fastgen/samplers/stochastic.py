"""Stochastic (SDE-type) baselines over a VE denoiser: EDM churn Heun and Euler ancestral.

Both take the VE state ``x`` at ``sigmas[0]`` and draw noise only from ``generator``.

- :func:`edm_sde` -- EDM Algorithm 2 (Karras et al. 2022): before each Heun step from ``t_i``, if
  ``s_tmin <= t_i <= s_tmax``, raise the noise level to ``t_hat = t_i (1 + gamma)`` with
  ``gamma = min(s_churn / N, sqrt(2) - 1)``. Expressed as a :class:`~fastgen.samplers.restart.RestartPlan`
  (a churn is a small forward jump), so it shares Restart's runner. NFE = Heun's ``2N - 1``.
- :func:`euler_ancestral` -- k-diffusion's ancestral Euler: an Euler step to
  ``sigma_down = sqrt(s_next^2 - sigma_up^2)``, then fresh noise of std ``sigma_up``,
  ``sigma_up = min(s_next, eta * sqrt(s_next^2 (s^2 - s_next^2) / s^2))``. NFE = N.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastgen.core import solvers
from fastgen.core.schedules import validate_sigmas
from fastgen.samplers.restart import RestartPlan, draw_noise, restart_sample


def edm_churn_plan(
    sigmas: Any, s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003
) -> RestartPlan:
    """The flat plan of EDM's stochastic sampler on the main grid ``sigmas`` (jumps = churn)."""
    main = validate_sigmas(sigmas, "sigmas").detach().double().cpu()
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}")
    n = len(main) - 1
    gamma = min(s_churn / n, 2**0.5 - 1)
    out, jumps = [float(main[0])], []
    for i in range(n):
        t = float(main[i])
        if gamma > 0 and s_tmin <= t <= s_tmax:
            out.append(t * (1 + gamma))
            jumps.append(True)
        out.append(float(main[i + 1]))
        jumps.append(False)
    return RestartPlan(torch.tensor(out, dtype=torch.float64), torch.tensor(jumps), float(s_noise))


def edm_sde(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Any,
    *,
    s_churn: float = 40.0,
    s_tmin: float = 0.05,
    s_tmax: float = 50.0,
    s_noise: float = 1.003,
    generator: torch.Generator | None = None,
    **cond: Any,
) -> torch.Tensor:
    """EDM's stochastic Heun sampler (defaults: EDM's ImageNet-64 settings). NFE = ``2 N - 1``."""
    plan = edm_churn_plan(sigmas, s_churn, s_tmin, s_tmax, s_noise)
    return restart_sample(denoiser, x, plan=plan, generator=generator, **cond)


def euler_ancestral(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Any,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    **cond: Any,
) -> torch.Tensor:
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``); ``eta = 0`` is plain Euler. NFE = N."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    s = validate_sigmas(sigmas, "sigmas").to(device=x.device, dtype=x.dtype)
    for i in range(len(s) - 1):
        sig, nxt = s[i], s[i + 1]
        up = torch.minimum(nxt, eta * (nxt**2 * (sig**2 - nxt**2) / sig**2).sqrt())
        down = (nxt**2 - up**2).sqrt()
        x = solvers.euler(denoiser, x, torch.stack([sig, down]), **cond)
        if float(nxt) > 0:
            x = x + draw_noise(x, generator) * (s_noise * up)
    return x
