"""Shortcut-model sampling, and the explicit conversion between the shortcut time and VE sigma.

**Conventions.** A shortcut model ``s(x_t, t, d, **cond) -> velocity`` (Frans et al. 2025) lives in
the rectified-flow convention where **t = 0 is noise and t = 1 is data**::

    x_t = (1 - t) * x0 + t * x1,      x0 ~ N(0, I) (noise),  x1 = data,   velocity = x1 - x0

(the official code shrinks the noise coefficient by ``1 - 1e-5``; this is ignored here). This is the
reverse of Diffusers' flow sigma (1 = noise) and is never flipped silently: every conversion goes
through the two functions below. Dividing by t gives fastgen's VE state::

    x = x_t / t = x1 + sigma * x0,    sigma = (1 - t) / t,    t = 1 / (1 + sigma)

so t = 0 is sigma = inf (pure noise: the sampler starts from ``noise`` itself, the t = 0 state) and
t = 1 is sigma = 0 (the VE state there *is* the sample). ``t`` and ``d`` are passed to the model as
``(B,)`` tensors; ``d`` is the real-valued step size in (0, 1] (how d enters the network is the
network adapter's business, see :class:`fastgen.models.shortcut.ShortcutNet`).

- :func:`shortcut_sample` -- ``n = 1, 2, 4, ...`` steps of ``x <- x + d * s(x, t, d)``, ``d = 1/n``.
- :class:`~fastgen.models.shortcut.ShortcutDenoiser` -- a shortcut model at a fixed ``d`` seen as a VE
  denoiser (so the
  flow-matching head ``d = 1/M`` runs with any fastgen solver; fastgen's Euler in sigma on it equals
  Euler in t on the velocity).
- :func:`flow_velocity` -- the exact rectified-flow velocity of any VE denoiser (e.g. the exact
  Gaussian-mixture denoiser), usable as a d-independent shortcut model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from fastgen.core.denoiser import rf_velocity, sigma_batch
from fastgen.core.schedules import rf_t_to_sigma, sigma_to_rf_t
from fastgen.models.shortcut import ShortcutDenoiser, num_levels

__all__ = [
    "ShortcutModel",
    "ShortcutDenoiser",
    "shortcut_t_to_sigma",
    "sigma_to_shortcut_t",
    "check_num_steps",
    "shortcut_schedule",
    "shortcut_sigmas",
    "shortcut_sample",
    "flow_velocity",
    "num_levels",
]


class ShortcutModel(Protocol):
    """``s(x_t, t, d, **cond) -> velocity`` with t = 0 noise, t = 1 data; t, d of shape (B,)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor, **cond: Any) -> torch.Tensor: ...


def shortcut_t_to_sigma(t: torch.Tensor | float) -> torch.Tensor:
    """Shortcut time (t = 0 noise, t = 1 data) to VE sigma ``(1 - t) / t`` (inf at t = 0, 0 at t = 1)."""
    t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, torch.Tensor) else t
    if ((t < 0) | (t > 1)).any():
        raise ValueError("t must lie in [0, 1] (shortcut convention: 0 = noise, 1 = data)")
    return rf_t_to_sigma(t)


def sigma_to_shortcut_t(sigma: torch.Tensor | float) -> torch.Tensor:
    """VE sigma to shortcut time ``1 / (1 + sigma)`` (sigma = inf -> 0 = noise, sigma = 0 -> 1 = data)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, torch.Tensor) else sigma
    if (sigma < 0).any():
        raise ValueError("sigma must be >= 0")
    return sigma_to_rf_t(sigma)


def check_num_steps(num_steps: int, max_steps: int | None = None) -> int:
    """Validate a power-of-two step count ``1 <= num_steps (<= max_steps)``; returns it as int."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a power of two >= 1, got {num_steps!r}")
    if num_steps & (num_steps - 1):
        raise ValueError(f"num_steps must be a power of two (1, 2, 4, ..., 128), got {num_steps}")
    if max_steps is not None and num_steps > max_steps:
        raise ValueError(f"num_steps must be <= the model's max_steps={max_steps}, got {num_steps}")
    return num_steps


def shortcut_schedule(num_steps: int) -> torch.Tensor:
    """The ``num_steps + 1`` shortcut times ``0, d, 2d, ..., 1`` (float64), ``d = 1/num_steps``."""
    check_num_steps(num_steps)
    return torch.arange(num_steps + 1, dtype=torch.float64) / num_steps


def shortcut_sigmas(num_steps: int) -> torch.Tensor:
    """The VE sigmas of :func:`shortcut_schedule`: ``inf, (1-d)/d, ..., 0`` (float64)."""
    return shortcut_t_to_sigma(shortcut_schedule(num_steps))


@torch.no_grad()
def shortcut_sample(
    model: ShortcutModel | Callable[..., torch.Tensor],
    noise: torch.Tensor,
    num_steps: int,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    check_finite: bool = True,
    **cond: Any,
) -> torch.Tensor:
    """Sample with ``num_steps`` equal shortcut steps ``x <- x + d * s(x, t, d)``, ``t = 0, d, ..., 1 - d``.

    Args:
        model: ``s(x_t, t, d, **cond)``; if it has ``max_steps``, ``num_steps`` must not exceed it.
        noise: the t = 0 state ``x0 ~ N(0, I)``, shape (B, ...) (not multiplied by any sigma).
        num_steps: a power of two (1, 2, 4, ...); NFE = num_steps.
        callback: called after each step with ``{"i", "t", "t_next", "x"}``.
        cond: passed to every model call (``class_labels=...``).

    Returns:
        The t = 1 state, i.e. the data sample (equal to the VE state at sigma = 0), shape of ``noise``.
    """
    check_num_steps(num_steps, getattr(model, "max_steps", None))
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ValueError("noise must be a floating-point tensor (the t = 0 state)")
    x = noise
    b = x.shape[0]
    d = torch.full((b,), 1.0 / num_steps, device=x.device, dtype=x.dtype)
    for i in range(num_steps):
        t = torch.full((b,), i / num_steps, device=x.device, dtype=x.dtype)
        v = model(x, t, d, **cond)
        if v.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(v.shape)} for input shape {tuple(x.shape)}")
        if check_finite and not torch.isfinite(v).all():
            raise FloatingPointError(f"shortcut model output is not finite at step {i} (t={i / num_steps:.6g})")
        x = x + d.reshape(-1, *([1] * (x.ndim - 1))) * v
        if callback is not None:
            callback({"i": i, "t": i / num_steps, "t_next": (i + 1) / num_steps, "x": x})
    return x


class _FlowVelocity(nn.Module):
    def __init__(self, denoiser: Callable[..., torch.Tensor], t_min: float) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.t_min = t_min

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        t = sigma_batch(t, x_t).clamp(self.t_min, 1.0)
        if (t >= 1).any():
            raise ValueError("t must be < 1: the velocity is not defined at the data end (sigma = 0)")
        return rf_velocity(self.denoiser, x_t, t, **cond)  # E[x1 | x_t] = D(x_t / t, (1 - t) / t)


def flow_velocity(denoiser: Callable[..., torch.Tensor], t_min: float = 1e-7) -> nn.Module:
    """The rectified-flow velocity ``E[x1 - x0 | x_t]`` of a VE denoiser, as a (d-ignoring) shortcut model.

    ``v = (E[x1|x_t] - x_t) / (1 - t)`` with ``E[x1|x_t] = D(x_t / t, (1 - t) / t)`` (an x0-predicting
    denoiser gives no better-conditioned form near t = 1); t is clamped to ``t_min`` (t = 0 is
    sigma = inf) and t = 1 is rejected.
    """
    if not 0 < t_min < 0.5:
        raise ValueError(f"t_min must be in (0, 0.5), got {t_min}")
    return _FlowVelocity(denoiser, t_min)
