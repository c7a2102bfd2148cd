"""Noise schedules: 1-D float tensors of sigmas, strictly decreasing, finite, ending in 0.

Units: every schedule here is in VE sigma (``x = x0 + sigma * eps``). A schedule of ``n`` steps
has ``n + 1`` entries; the last is 0 unless said otherwise. :func:`validate_sigmas` guards every
entry point that takes a schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: What :func:`validate_sigmas` accepts, quoted in its error messages.
SIGMAS_ACCEPTED = "a 1-D schedule of >= 2 finite sigmas, strictly decreasing, all > 0 except a final 0"


def validate_sigmas(sigmas: Any, name: str = "sigmas", allow_final_positive: bool = True) -> torch.Tensor:
    """Check a schedule and return it as a tensor (float64 unless already floating).

    Accepted: a 1-D sequence of at least 2 finite sigmas, strictly decreasing, all positive except
    possibly the last which may be 0. Raises ``ValueError`` naming ``name`` and the accepted range
    otherwise. A tensor is returned as is (same dtype, device and autograd graph).
    """
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be {SIGMAS_ACCEPTED}; got {type(sigmas).__name__}") from err
    if not sigmas.is_floating_point():
        sigmas = sigmas.double()
    if sigmas.ndim != 1:
        raise ValueError(f"{name} must be {SIGMAS_ACCEPTED}; got shape {tuple(sigmas.shape)}")
    if sigmas.shape[0] < 2:
        raise ValueError(f"{name} must be {SIGMAS_ACCEPTED}; got {sigmas.shape[0]} entries")
    s = sigmas.detach()
    if not torch.isfinite(s).all():
        bad = int(torch.nonzero(~torch.isfinite(s))[0])
        raise ValueError(f"{name} must be {SIGMAS_ACCEPTED}; entry {bad} is {float(s[bad])}")
    if not (s[1:] < s[:-1]).all():
        bad = int(torch.nonzero(s[1:] >= s[:-1])[0])
        raise ValueError(
            f"{name} must be {SIGMAS_ACCEPTED}; it is not strictly decreasing: entry {bad + 1} "
            f"({float(s[bad + 1]):.6g}) is not below entry {bad} ({float(s[bad]):.6g})"
        )
    if (s[:-1] <= 0).any() or s[-1] < 0:
        raise ValueError(f"{name} must be {SIGMAS_ACCEPTED}; got minimum {float(s.min()):.6g}")
    if not allow_final_positive and s[-1] != 0:
        raise ValueError(f"{name} must be {SIGMAS_ACCEPTED} and end in 0; got final sigma {float(s[-1]):.6g}")
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


def flow_uniform(
    n: int,
    sigma_min: float,
    sigma_max: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Uniform in flow time ``t = sigma / (1 + sigma)`` from ``t(sigma_max)`` to ``t(sigma_min)``, then 0.

    The grid of a flow-matching pipeline's own scheduler (``FlowMatchEulerDiscreteScheduler`` at shift 1
    spaces ``t`` uniformly), in VE sigma: where a flow model's trajectory bends, Karras' rho = 7 over
    [0.001, 1000] puts half its points above sigma ~ 19 (t > 0.95).
    """
    _check_range(n, sigma_min, sigma_max)
    t_hi, t_lo = (float(sigma_to_flow_t(torch.tensor(v, dtype=torch.float64))) for v in (sigma_max, sigma_min))
    t = torch.linspace(t_hi, t_lo, n, dtype=torch.float64) if n > 1 else torch.tensor([t_hi], dtype=torch.float64)
    s = flow_t_to_sigma(t)
    s[0] = sigma_max
    if n > 1:
        s[-1] = sigma_min
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
    capped = t >= t_cap
    sigma = torch.clamp(t, max=t_cap) / (1 - torch.clamp(t, max=t_cap))
    return torch.where(capped, torch.full_like(sigma, FLOW_SIGMA_MAX), sigma)


def sigma_to_flow_t(sigma: torch.Tensor) -> torch.Tensor:
    """VE sigma to flow time ``sigma / (1 + sigma)`` (Diffusers convention, 1 = noise)."""
    return sigma / (1 + sigma)


# --------------------------------------------------------------------------------------------
# Conversions between the VE state and the VP / Diffusers-flow / rectified-flow conventions
# --------------------------------------------------------------------------------------------


def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """VP ``alpha_bar = 1 / (1 + sigma^2)`` of a VE sigma."""
    return 1 / (1 + torch.as_tensor(sigma) ** 2)


def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    """VE ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` of a VP ``alpha_bar`` in (0, 1]."""
    alpha_bar = torch.as_tensor(alpha_bar)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def _col(sigma: Any, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim == 1 else s


def ve_to_vp(x: torch.Tensor, sigma: Any) -> torch.Tensor:
    """VE state ``x0 + sigma eps`` to the VP state ``x / sqrt(1 + sigma^2)`` (sigma scalar or (B,))."""
    return x / (1 + _col(sigma, x) ** 2).sqrt()


def vp_to_ve(x_vp: torch.Tensor, sigma: Any) -> torch.Tensor:
    """Inverse of :func:`ve_to_vp`."""
    return x_vp * (1 + _col(sigma, x_vp) ** 2).sqrt()


def ve_to_flow(x: torch.Tensor, sigma: Any) -> torch.Tensor:
    """VE state to the Diffusers flow state ``x / (1 + sigma) = (1 - t) x0 + t eps``, t = sigma/(1+sigma)."""
    return x / (1 + _col(sigma, x))


def flow_to_ve(x_fm: torch.Tensor, t: Any) -> torch.Tensor:
    """Diffusers flow state at flow time ``t`` in [0, 1) (1 = noise) to the VE state ``x_fm / (1 - t)``."""
    return x_fm / (1 - _col(t, x_fm))


def rf_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow time (t = 0 noise, t = 1 data; ``x_t = (1-t) x0 + t x1``) to VE ``sigma = (1-t)/t``."""
    t = torch.as_tensor(t)
    return (1 - t) / t


def sigma_to_rf_t(sigma: torch.Tensor) -> torch.Tensor:
    """VE sigma to rectified-flow time ``t = 1 / (1 + sigma)`` (opposite direction to Diffusers' flow t)."""
    return 1 / (1 + torch.as_tensor(sigma))


def sigma_to_timestep(sigmas: Any, table: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep(s) of VE ``sigmas`` over an ascending sigma ``table`` (float64).

    Diffusers' ``_sigma_to_t`` rule: t is linear in log-sigma between neighbouring table entries,
    clamped to the table's range. The one implementation used by the VP adapter, the schedulers and
    :meth:`fastgen.samplers.schedule.Schedule.to_diffusers_timesteps`.
    """
    log_t = table.double().log()
    ls = torch.as_tensor(sigmas, dtype=torch.float64).to(log_t.device).clamp(min=1e-10).log()
    idx = torch.searchsorted(log_t, ls.reshape(-1).contiguous()).reshape(ls.shape)
    low = (idx - 1).clamp(0, log_t.shape[0] - 2)
    w = ((ls - log_t[low]) / (log_t[low + 1] - log_t[low])).clamp(0, 1)
    return low.double() + w


def is_flow_config(config: Any) -> bool:
    """True for a Diffusers flow-matching config (class name has FlowMatch, or ``shift`` and no betas)."""
    config = dict(config)
    name = str(config.get("_class_name", ""))
    if "FlowMatch" in name:
        return True
    return "shift" in config and "beta_schedule" not in config


#: How a knots-form schedule (positive end) meets sigma = 0: as is, one more step to 0, or its end -> 0.
TERMINALS = ("keep", "append", "replace")


def _check_terminal(terminal: str) -> None:
    if terminal not in TERMINALS:
        raise ValueError(f"terminal must be one of {TERMINALS}, got {terminal!r}")


def apply_terminal(sigmas: torch.Tensor, terminal: str) -> torch.Tensor:
    """Return ``sigmas`` ending in 0 per ``terminal`` ("keep" leaves a positive end as is)."""
    _check_terminal(terminal)
    sigmas = validate_sigmas(sigmas)
    if float(sigmas[-1]) == 0 or terminal == "keep":
        return sigmas.clone()
    if terminal == "append":
        return torch.cat([sigmas, sigmas.new_zeros(1)])
    if sigmas.shape[0] < 3:
        raise ValueError("terminal='replace' needs at least 3 sigmas (2 positive ones are left)")
    return torch.cat([sigmas[:-1], sigmas.new_zeros(1)])
