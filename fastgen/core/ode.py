"""Reference probability-flow ODE solves with ``torchdiffeq`` (ground truth for benchmarks).

The ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` is integrated in ``u = log sigma``
(``dx/du = x - D``), which is smooth across decades of sigma, with an adaptive method
(``dopri5`` by default) at the given tolerances. An endpoint sigma = 0 is reached by integrating
to ``sigma_floor`` and applying one denoiser call there (error O(sigma_floor^2)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchdiffeq import odeint

from fastgen.core.schedules import validate_sigmas


def reference_trajectory(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Any,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    sigma_floor: float = 1e-4,
    **cond: Any,
) -> torch.Tensor:
    """States of the exact ODE solution at every entry of ``sigmas``; shape ``(len(sigmas), *x.shape)``.

    ``x`` is the state at ``sigmas[0]``. The result's first entry is ``x`` itself.
    """
    sigmas = validate_sigmas(sigmas)
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    s = sigmas.detach().to(device=x.device, dtype=torch.float64)
    final_zero = float(s[-1]) == 0
    if final_zero:
        if sigma_floor <= 0 or sigma_floor >= float(s[-2]):
            raise ValueError(f"sigma_floor must be in (0, {float(s[-2])}), got {sigma_floor}")
        s = torch.cat([s[:-1], s.new_tensor([sigma_floor])])
    u = s.log()
    x64 = x.detach().double()

    def rhs(u_t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        sigma = u_t.exp()
        return state - denoiser(state.to(x.dtype), sigma.to(x.dtype), **cond).double()

    with torch.no_grad():
        traj = odeint(rhs, x64, u, rtol=rtol, atol=atol, method=method)
        if final_zero:
            traj[-1] = denoiser(traj[-1].to(x.dtype), s[-1].to(x.dtype), **cond).double()
    return traj.to(x.dtype)


def reference_solve(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma_start: float,
    sigma_end: float = 0.0,
    **kwargs: Any,
) -> torch.Tensor:
    """The exact ODE map from ``sigma_start`` to ``sigma_end`` (>= 0) applied to ``x``."""
    sigmas = torch.tensor([float(sigma_start), float(sigma_end)], dtype=torch.float64)
    return reference_trajectory(denoiser, x, sigmas, **kwargs)[-1]
