"""Align Your Steps (Sabour, Fidler, Kreis, ICML 2024): published schedules and the optimizer.

- :func:`ays_sigmas` / :func:`ays_timesteps`: the published 10-step schedules for SD1.5, SDXL and
  SVD, and their log-linear interpolation to any step count (the AYS rule).
- :func:`optimize_ays`: the AYS optimizer for any denoiser and data (or model samples): the KLUB
  objective of stochastic DDIM with the Gaussian importance sampling of the paper, zeroth-order
  coordinate-wise refinement (11 candidates per interior point, non-adjacent points in parallel,
  common random numbers so the KLUB never rises), and subdivision 10 -> 20 -> 40 at log-midpoints
  (only the new points are optimised). Early stopping by a validation callable, as the KLUB
  optimum is not the KL optimum.

Units: VE sigma throughout (``x = x0 + sigma * eps``). The published lists end in the model's
minimum sigma (0.029 for SD), not 0; :class:`fastgen.samplers.schedule.Schedule` makes the final
step to 0 an explicit ``terminal`` choice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from fastgen.core.schedules import karras, loglinear_interp
from fastgen.samplers.optim_common import resolve_sigma_range
from fastgen.samplers.schedule import Schedule

#: Published 10-step AYS sigmas (high -> low, 11 knots, ending in the model's minimum sigma).
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}

#: Published 10-step AYS timesteps (11 entries ending in 0; Diffusers' ``AysSchedules`` drops the 0).
AYS_TIMESTEPS: dict[str, tuple[int, ...]] = {
    "sd15": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
    "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0),
}

#: Gaussian scale c of the importance-sampling proposal (the paper's choice).
IS_SCALE = 0.5


def _check_model(model: str) -> str:
    if model not in AYS_SIGMAS:
        raise ValueError(f"model must be one of {sorted(AYS_SIGMAS)}, got {model!r}")
    return model


def ays_sigmas(model: str, n: int = 10) -> torch.Tensor:
    """The published AYS schedule of ``model`` ("sd15" | "sdxl" | "svd") for ``n`` steps.

    Returns ``n + 1`` positive knots (float64, high -> low): log-sigma is interpolated linearly in
    the normalised index over the 11 published knots. ``n = 10`` gives the published list exactly,
    ending in the published minimum (0.029 / 0.002), not 0.
    """
    knots = torch.tensor(AYS_SIGMAS[_check_model(model)], dtype=torch.float64)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be an integer >= 1, got {n!r}")
    return loglinear_interp(knots, n + 1)


def ays_timesteps(model: str) -> list[int]:
    """The published 10-step AYS timesteps of ``model`` ("sd15" | "sdxl"; SVD is continuous)."""
    if _check_model(model) not in AYS_TIMESTEPS:
        raise ValueError(f"model {model!r} is continuous-time: AYS published sigmas only (use ays_sigmas)")
    return list(AYS_TIMESTEPS[model])


def ays_schedule(model: str, n: int = 10) -> Schedule:
    """:func:`ays_sigmas` as a :class:`Schedule` (knots form; choose ``terminal`` when converting)."""
    return Schedule(ays_sigmas(model, n), method="ays-published", model=model, meta={"steps": n})


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


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------


def _check_data(data: Any, name: str = "data") -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.ndim < 2:
        raise ValueError(f"{name} must be a tensor of shape (N, ...) with N >= 1")
    if data.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples); pass at least one data sample")
    if not torch.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return data


def optimize_ays(
    denoiser: Callable[..., torch.Tensor],
    data: torch.Tensor,
    *,
    n: int | None = None,
    subdivisions: int = 0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    iterations: int = 8,
    num_samples: int = 256,
    num_candidates: int = 11,
    init: str = "karras",
    validate: Callable[[torch.Tensor], float] | None = None,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    model_id: str | None = None,
    solver: str | None = None,
    nfe: int | None = None,
    val_noise: int = 0,
    **cond: Any,
) -> Schedule:
    """Optimise an AYS schedule for ``denoiser`` on ``data`` (N, ...) (training data or model samples).

    Args:
        n: steps of the first level (10 in the paper, the default without ``solver``/``nfe``; with
            both given the default is the solver's step count for ``nfe``, which the benchmarks
            found more reliable at 4-8 NFE than interpolating a 10-step result); the result has
            ``n * 2**subdivisions`` steps.
        subdivisions: number of 2x subdivisions at log-midpoints (2 gives 10 -> 20 -> 40).
        sigma_min, sigma_max: the fixed end knots (VE sigma); default the denoiser's range, else
            [0.002, 80]. ValueError if outside the denoiser's ``sigma_min``/``sigma_max``.
        iterations: coordinate-wise sweeps per level (at most 300); with ``validate`` the best
            sweep by validation score is kept (early stopping), else the last.
        num_samples: Monte Carlo samples per KLUB estimate (redrawn each sweep).
        num_candidates: candidates per interior point, the current value included.
        init: "karras" (EDM rho = 7, continuous models) or "loglinear".
        validate: optional ``f(knots) -> float`` (lower is better), e.g. FD or ODE error.
        class_labels: optional (N,) labels of ``data`` passed as ``class_labels=`` to the denoiser.
        solver, nfe, val_noise: with all three given (``val_noise`` > 0) and no ``validate``, the
            built-in early stopping scores each sweep (and the initial schedule) by the endpoint RMSE of
            ``solver`` at ``nfe`` calls (knots resampled by :func:`for_solver`) against the reference
            ODE on ``val_noise`` Gaussian noises drawn from ``generator``.

    Returns a :class:`Schedule` in knots form: ``n * 2**subdivisions + 1`` positive sigmas from
    ``sigma_max`` to ``sigma_min`` (use ``terminal="replace"`` or ``"append"`` to end in 0).
    """
    t_start = time.perf_counter()
    data = _check_data(data)
    lo, hi = resolve_sigma_range(denoiser, sigma_min, sigma_max)
    if n is None:
        from fastgen.samplers.schedule import steps_within_nfe

        n = steps_within_nfe(solver, nfe) if solver is not None and nfe is not None else 10
    if not isinstance(n, int) or n < 2:
        raise ValueError(
            f"n must be an integer >= 2 (at least one interior sigma to optimise), got {n!r}"
            + (f" (nfe={nfe} is too small for solver {solver!r})" if nfe is not None else "")
        )
    if not isinstance(subdivisions, int) or not 0 <= subdivisions <= 4:
        raise ValueError(f"subdivisions must be an integer in [0, 4], got {subdivisions!r}")
    if not isinstance(iterations, int) or not 1 <= iterations <= 300:
        raise ValueError(f"iterations must be an integer in [1, 300], got {iterations!r}")
    if num_samples < 1 or num_candidates < 2:
        raise ValueError(
            f"need num_samples >= 1 and num_candidates >= 2, got {num_samples}, {num_candidates}"
        )
    if class_labels is not None and class_labels.shape[0] != data.shape[0]:
        raise ValueError(f"class_labels must have shape ({data.shape[0]},), got {tuple(class_labels.shape)}")
    if init == "karras":
        knots = karras(n + 1, lo, hi)[:-1]
    elif init == "loglinear":
        knots = torch.linspace(math.log(hi), math.log(lo), n + 1, dtype=torch.float64).exp()
    else:
        raise ValueError(f"init must be 'karras' or 'loglinear', got {init!r}")
    t = knots.flip(0).clone()  # ascending: t[0] = sigma_min, t[-1] = sigma_max
    t[0], t[-1] = lo, hi  # exact end points (rho-th powers round)
    if validate is None and val_noise > 0:
        if solver is None or nfe is None:
            raise ValueError("val_noise > 0 needs solver and nfe (the schedule's use) for early stopping")
        vdtype = data.dtype if data.dtype in (torch.float32, torch.float64) else torch.float32
        vcond = dict(cond)
        if class_labels is not None:
            pick = torch.randint(0, data.shape[0], (val_noise,), generator=generator)
            vcond["class_labels"] = class_labels[pick]
        validate = ode_validator(denoiser, data.shape[1:], solver, nfe, val_noise, hi, generator,
                                 dtype=vdtype, **vcond)
    history: list[dict[str, float]] = []
    total = iterations * (subdivisions + 1)
    bar = tqdm(total=total, desc="AYS", disable=not progress, leave=False)
    klub = float("nan")
    for level in range(subdivisions + 1):
        if level > 0:
            mids = (0.5 * (t[:-1].log() + t[1:].log())).exp()
            new = torch.empty(2 * t.shape[0] - 1, dtype=torch.float64)
            new[0::2], new[1::2] = t, mids
            t = new
            groups = [torch.arange(1, t.shape[0] - 1, 2)]  # only the new points, all non-adjacent
        else:
            interior = torch.arange(1, t.shape[0] - 1)
            groups = [interior[0::2], interior[1::2]]
        best_t = t.clone()
        best_score = validate(t.flip(0).clone()) if validate is not None else math.inf
        for it in range(iterations):
            for grp in groups:
                if grp.numel() == 0:
                    continue
                x0, eps, eps2, u, cnd = _draw(data, class_labels, num_samples, generator)
                t = _refine_group(denoiser, t, grp, num_candidates, x0, eps, eps2, u, {**cond, **cnd})
            x0, eps, eps2, u, cnd = _draw(data, class_labels, num_samples, generator)
            klub = float(klub_intervals(denoiser, t[:-1], t[1:], x0, eps, eps2, u, {**cond, **cnd}).sum())
            score = validate(t.flip(0).clone()) if validate is not None else -it
            history.append({"level": level, "iteration": it, "klub": klub, "score": float(score)})
            if score < best_score:
                best_t, best_score = t.clone(), float(score)
            bar.update(1)
            bar.set_postfix(level=level, klub=f"{klub:.4g}")
        t = best_t
    bar.close()
    return Schedule(
        t.flip(0),
        method="ays",
        solver=solver,
        nfe=nfe,
        model=model_id,
        objective=klub,
        meta={
            "objective_name": "KLUB per dimension (stochastic DDIM, Girsanov)",
            "sigma_min": lo,
            "sigma_max": hi,
            "levels": [n * 2**k for k in range(subdivisions + 1)],
            "iterations": iterations,
            "num_samples": num_samples,
            "optimization_seconds": round(time.perf_counter() - t_start, 3),
            "history": history[-5:],
        },
    )


def _draw(data: torch.Tensor, labels: torch.Tensor | None, m: int, generator: torch.Generator | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    idx = torch.randint(0, data.shape[0], (m,), generator=generator)
    x0 = data[idx].double()
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    eps2 = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    u = torch.rand(m, generator=generator, dtype=torch.float64)
    cond = {} if labels is None else {"class_labels": labels[idx]}
    return x0.to(data.dtype), eps.to(data.dtype), eps2.to(data.dtype), u, cond


def _refine_group(denoiser: Callable[..., torch.Tensor], t: torch.Tensor, grp: torch.Tensor, k: int,
                  x0: torch.Tensor, eps: torch.Tensor, eps2: torch.Tensor, u: torch.Tensor,
                  cond: dict[str, Any]) -> torch.Tensor:
    """Move each point of ``grp`` (non-adjacent interior indices of ascending ``t``) to the best of
    ``k`` candidates in its neighbours' interval by local KLUB; the current value is a candidate."""
    left, right, cur = t[grp - 1], t[grp + 1], t[grp]
    frac = torch.arange(1, k, dtype=torch.float64) / k  # k - 1 fresh candidates, strictly inside
    cands = (left.log()[:, None] + frac[None] * (right.log() - left.log())[:, None]).exp()
    cands = torch.cat([cur[:, None], cands], 1)  # (P, k), column 0 = current
    p = grp.numel()
    lows = torch.cat([left[:, None].expand(p, k), cands], 0).reshape(-1)
    highs = torch.cat([cands, right[:, None].expand(p, k)], 0).reshape(-1)
    vals = klub_intervals(denoiser, lows, highs, x0, eps, eps2, u, cond).reshape(2, p, k).sum(0)
    best = vals.argmin(1)
    t = t.clone()
    t[grp] = cands[torch.arange(p), best]
    return t


def for_solver(schedule: Schedule, solver: str, nfe: int) -> Schedule:
    """An AYS knots schedule made ready for ``solver`` at ``nfe`` calls: resampled log-linearly to
    ``steps_within_nfe(solver, nfe)`` steps and the final knot replaced by 0 (Diffusers' convention)."""
    from fastgen.samplers.schedule import steps_within_nfe

    steps = steps_within_nfe(solver, nfe)
    knots = loglinear_interp(schedule.sigmas[schedule.sigmas > 0], steps + 1) if steps >= 1 else None
    if steps < 2:
        sig = torch.stack([schedule.sigmas[0], schedule.sigmas.new_zeros(())])
    else:
        sig = torch.cat([knots[:-1], knots.new_zeros(1)])
    return Schedule(sig, method=schedule.method, solver=solver, nfe=nfe, model=schedule.model,
                    objective=schedule.objective, meta={**schedule.meta, "resampled_from": schedule.steps})


def ode_validator(denoiser: Callable[..., torch.Tensor], shape: tuple[int, ...], solver: str, nfe: int,
                  num: int, sigma_max: float, generator: torch.Generator | None,
                  dtype: torch.dtype = torch.float64, **cond: Any) -> Callable[[torch.Tensor], float]:
    """``f(knots) -> endpoint RMSE`` of ``solver`` at ``nfe`` on ``num`` fixed noises vs the reference ODE."""
    from fastgen.core.ode import reference_solve
    from fastgen.samplers.schedule import endpoint_rmse

    noise = torch.randn(num, *shape, generator=generator, dtype=torch.float64).to(dtype)
    ref = reference_solve(denoiser, noise * sigma_max, sigma_max, 0.0, **cond)

    def score(knots: torch.Tensor) -> float:
        sched = for_solver(Schedule(knots), solver, nfe)
        return endpoint_rmse(denoiser, sched, noise, ref, solver, **cond)

    return score
