"""The AYS objective: KLUB of stochastic DDIM (Girsanov) with the paper's Gaussian importance sampling.

Units: VE sigma (``x = x0 + sigma * eps``). For data N(0, c^2 I) with its exact denoiser the
per-dimension gap is :func:`gaussian_gap`; :func:`klub_intervals` estimates each interval's KLUB
by sampling ``t`` from a proposal proportional to ``t^-3 g`` (:func:`_proposal`), which is unbiased
and has zero variance on Gaussian data. :func:`kl_optimal_gaussian` is the KL-optimal schedule
for Gaussian data (Thm 3.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

#: Gaussian scale c of the importance-sampling proposal (the paper's choice).
IS_SCALE = 0.5


def kl_optimal_gaussian(n: int, sigma_min: float, sigma_max: float, c: float = IS_SCALE) -> torch.Tensor:
    """AYS Theorem 3.1: the KL-optimal ``n``-step schedule for data N(0, c^2 I), ``n + 1`` knots high -> low:
    ``t_i = c tan((1 - i/n) arctan(sigma_max/c) + (i/n) arctan(sigma_min/c))`` (arctan-uniform)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not 0 < sigma_min < sigma_max or c <= 0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and c > 0, got {sigma_min}, {sigma_max}, {c}")
    w = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    return c * torch.tan((1 - w) * math.atan(sigma_max / c) + w * math.atan(sigma_min / c))


# ----------------------------------------------------------------------------------------------
# KLUB and its importance sampling
# ----------------------------------------------------------------------------------------------


def gaussian_gap(t: torch.Tensor, t_up: torch.Tensor, c: float = IS_SCALE) -> torch.Tensor:
    """``g(t, t_up) = c^4 (1/(t^2+c^2) - 1/(t_up^2+c^2))``: per-dimension E||D(x_t,t) - D(x_up,t_up)||^2
    for data N(0, c^2 I) and its exact denoiser (the AYS importance-sampling weight)."""
    return c**4 * (1 / (t**2 + c**2) - 1 / (t_up**2 + c**2))


def _proposal(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, grid: int = 129, c: float = IS_SCALE
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw t in [a_j, b_j] from pi ∝ t^-3 g(t, b_j) by inverse CDF, given uniforms u (M,).

    Returns ``(t (J, M), g(t, b) (J, M), Z (J,))`` with ``Z = ∫_a^b t^-3 g(t, b) dt``.
    """
    s = torch.linspace(0, 1, grid, dtype=torch.float64)
    la, lb = a.log(), b.log()
    lt = la[:, None] + (lb - la)[:, None] * s[None]  # (J, G), integration variable log t
    tt = lt.exp()
    dens = tt**-2 * gaussian_gap(tt, b[:, None], c)  # t^-3 g dt = t^-2 g d(log t)
    du = (lb - la)[:, None] / (grid - 1)
    steps = torch.cumsum(0.5 * (dens[:, 1:] + dens[:, :-1]) * du, 1)
    cdf = torch.cat([dens.new_zeros(dens.shape[0], 1), steps], 1)
    z = cdf[:, -1]
    target = u[None, :] * z[:, None]  # (J, M)
    idx = torch.searchsorted(cdf, target.contiguous()).clamp(1, grid - 1)
    c0, c1 = cdf.gather(1, idx - 1), cdf.gather(1, idx)
    l0, l1 = lt.gather(1, idx - 1), lt.gather(1, idx)
    w = ((target - c0) / (c1 - c0).clamp(min=1e-300)).clamp(0, 1)
    t = (l0 + w * (l1 - l0)).exp()
    t = torch.minimum(torch.maximum(t, a[:, None]), b[:, None] * (1 - 1e-9))
    return t, gaussian_gap(t, b[:, None], c).clamp(min=1e-300), z


def klub_intervals(
    denoiser: Callable[..., torch.Tensor],
    lows: torch.Tensor,
    highs: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    eps2: torch.Tensor,
    u: torch.Tensor,
    cond: dict[str, Any] | None = None,
    chunk: int = 8192,
) -> torch.Tensor:
    """KLUB of each interval ``[lows_j, highs_j]`` (VE sigmas, low < high), per data dimension.

    ``∫ w(t) E||D(x_t, t) - D(x_high, high)||^2 dt`` with ``w = 1/t^3``, ``x_t = x0 + t eps``,
    ``x_high = x_t + sqrt(high^2 - t^2) eps2``, estimated with M samples ``x0, eps, eps2`` (M, ...)
    and uniforms ``u`` (M,) shared by all intervals (common random numbers): ``Z mean(||ΔD||^2 / (d g))``.
    Returns (J,) float64.
    """
    cond = cond or {}
    lows, highs = lows.double(), highs.double()
    t, g, z = _proposal(lows, highs, u.double())
    j, m = t.shape
    shape = x0.shape[1:]
    dim = x0[0].numel()
    tb = t.reshape(-1)
    hb = highs[:, None].expand(j, m).reshape(-1)
    x0r = x0.double().repeat(j, *([1] * len(shape)))
    e1 = eps.double().repeat(j, *([1] * len(shape)))
    e2 = eps2.double().repeat(j, *([1] * len(shape)))
    cond_r = {k: (v.repeat(j) if isinstance(v, torch.Tensor) and v.ndim == 1 and v.shape[0] == m else v)
              for k, v in cond.items()}
    view = (-1,) + (1,) * len(shape)
    xt = x0r + tb.view(view) * e1
    xh = xt + (hb**2 - tb**2).clamp(min=0).sqrt().view(view) * e2
    dtype = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
    sq = []
    with torch.no_grad():
        for i in range(0, xt.shape[0], chunk):
            sl = slice(i, i + chunk)
            cc = {k: (v[sl] if isinstance(v, torch.Tensor) and v.ndim == 1 and v.shape[0] == xt.shape[0]
                      else v) for k, v in cond_r.items()}
            d1 = denoiser(xt[sl].to(dtype), tb[sl].to(dtype), **cc).double()
            d2 = denoiser(xh[sl].to(dtype), hb[sl].to(dtype), **cc).double()
            sq.append(((d1 - d2) ** 2).reshape(d1.shape[0], -1).sum(1))
    sq = torch.cat(sq).reshape(j, m)
    return z * (sq / (dim * g)).mean(1)
