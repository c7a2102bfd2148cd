"""Noise schedules: 1-D float tensors of sigmas, strictly decreasing, finite, ending in 0.

Units: every schedule here is in VE sigma (``x = x0 + sigma * eps``). A schedule of ``n`` steps
has ``n + 1`` entries; the last is 0 unless said otherwise. :func:`validate_sigmas` guards every
entry point that takes a schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def validate_sigmas(sigmas: Any, name: str = "sigmas", allow_final_positive: bool = True) -> torch.Tensor:
    """Check a schedule and return it as a tensor (float64 unless already floating).

    Accepted: a 1-D sequence of at least 2 finite sigmas, strictly decreasing, all positive except
    possibly the last which may be 0. Raises ``ValueError`` naming ``name`` otherwise.
    """
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a 1-D sequence of floats, got {type(sigmas).__name__}") from err
    if not sigmas.is_floating_point():
        sigmas = sigmas.double()
    if sigmas.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(sigmas.shape)}")
    if sigmas.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 entries (one step), got {sigmas.shape[0]}")
    s = sigmas.detach()
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} must be finite, got {s.tolist()}")
    if not (s[1:] < s[:-1]).all():
        bad = int(torch.nonzero(s[1:] >= s[:-1])[0])
        raise ValueError(
            f"{name} must be strictly decreasing; entry {bad + 1} ({float(s[bad + 1]):.6g}) is not below "
            f"entry {bad} ({float(s[bad]):.6g})"
        )
    if (s[:-1] <= 0).any() or s[-1] < 0:
        raise ValueError(f"{name} must be positive except a final 0, got minimum {float(s.min()):.6g}")
    if not allow_final_positive and s[-1] != 0:
        raise ValueError(f"{name} must end in 0, got final sigma {float(s[-1]):.6g}")
    return sigmas


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be an integer >= 1, got {n!r}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def karras(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Karras et al. (2022) schedule: ``n`` steps, ``n + 1`` sigmas ending in 0.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    """
    _check_range(n, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return _append_zero(s).to(device=device, dtype=dtype)


def loglinear(
    n: int,
    sigma_min: float,
    sigma_max: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Log-linear ("exponential") schedule: log-sigma uniform from sigma_max to sigma_min, then 0."""
    _check_range(n, sigma_min, sigma_max)
    if n == 1:
        s = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return _append_zero(s).to(device=device, dtype=dtype)


def vp_time_uniform(
    n: int,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    eps_s: float = 1e-3,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """VP-SDE schedule uniform in time t from 1 to ``eps_s`` (EDM's VP), then 0.

    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be an integer >= 1, got {n!r}")
    if not 0 < eps_s < 1:
        raise ValueError(f"eps_s must be in (0, 1), got {eps_s}")
    t = torch.linspace(1, eps_s, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    s = torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))
    return _append_zero(s).to(device=device, dtype=dtype)


def loglinear_interp(knots: torch.Tensor, num: int) -> torch.Tensor:
    """Interpolate positive decreasing ``knots`` log-linearly (in index) to ``num`` knots.

    This is the AYS rule: ``log sigma`` is a piecewise-linear function of the normalised index.
    Interpolating to the same length is the identity.
    """
    knots = torch.as_tensor(knots, dtype=torch.float64) if not isinstance(knots, torch.Tensor) else knots
    if knots.ndim != 1 or knots.shape[0] < 2 or (knots <= 0).any():
        raise ValueError("knots must be a 1-D tensor of at least 2 positive sigmas")
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    m = knots.shape[0]
    if num == m:
        return knots.clone()
    logk = knots.double().log()
    pos = torch.linspace(0, m - 1, num, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=m - 2)
    w = pos - lo
    out = (logk[lo] * (1 - w) + logk[lo + 1] * w).exp()
    return out.to(knots.dtype)


def resample(sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """Resample a schedule to ``n`` steps by log-linear interpolation of its positive knots.

    A schedule ending in 0 keeps its final 0 (``n`` positive knots + 0); one without a final 0
    gets ``n + 1`` positive knots. Endpoints are preserved.
    """
    sigmas = validate_sigmas(sigmas)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if sigmas[-1] == 0:
        pos = sigmas[:-1]
        if n == 1:
            return torch.stack([pos[0], sigmas[-1]])
        if pos.shape[0] < 2:
            raise ValueError("cannot interpolate a schedule with a single positive sigma")
        return _append_zero(loglinear_interp(pos, n))
    return loglinear_interp(sigmas, n + 1)


def diffusers_table(scheduler_config: Any, n: int, **set_timesteps_kwargs: Any) -> torch.Tensor:
    """The schedule Diffusers' Euler scheduler would use for ``n`` steps on this config (VE sigmas).

    VP configs (DDPM/SD, any ``beta_schedule``, ``timestep_spacing``) go through
    ``EulerDiscreteScheduler``; flow-matching configs (with ``shift``) through
    ``FlowMatchEulerDiscreteScheduler``, converted to VE by ``sigma = t / (1 - t)``. A flow
    schedule that starts at t = 1 (infinite VE sigma) is capped at ``FLOW_SIGMA_MAX``.
    """
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    config = dict(scheduler_config)
    if is_flow_config(config):
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
        sched.set_timesteps(n, **set_timesteps_kwargs)
        t = sched.sigmas.double()
        return flow_t_to_sigma(t)
    sched = EulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(n, **set_timesteps_kwargs)
    return sched.sigmas.double()


#: VE sigma used for flow time t = 1 (pure noise), where sigma = t / (1 - t) is infinite.
FLOW_SIGMA_MAX = 1000.0


def flow_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """Flow time (Diffusers convention, 1 = noise) to VE sigma ``t / (1 - t)``, capped at FLOW_SIGMA_MAX."""
    t = torch.as_tensor(t, dtype=torch.float64)
    t_cap = FLOW_SIGMA_MAX / (1 + FLOW_SIGMA_MAX)
    t = torch.clamp(t, max=t_cap)
    return t / (1 - t)


def sigma_to_flow_t(sigma: torch.Tensor) -> torch.Tensor:
    """VE sigma to flow time ``sigma / (1 + sigma)`` (Diffusers convention, 1 = noise)."""
    return sigma / (1 + sigma)


def is_flow_config(config: Any) -> bool:
    """True for a Diffusers flow-matching scheduler config (class name contains FlowMatch or has ``shift``)."""
    config = dict(config)
    name = str(config.get("_class_name", ""))
    if "FlowMatch" in name:
        return True
    return "shift" in config and "beta_schedule" not in config
