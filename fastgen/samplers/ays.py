"""Align Your Steps (Sabour, Fidler, Kreis, ICML 2024): published schedules and the optimizer.

- :func:`ays_sigmas` / :func:`ays_timesteps`: the published 10-step schedules for SD1.5, SDXL and
  SVD, and their log-linear interpolation to any step count (the AYS rule).
- :func:`optimize_ays`: the AYS optimizer for any denoiser and data (or model samples): the KLUB
  objective of stochastic DDIM with the Gaussian importance sampling of the paper, zeroth-order
  coordinate-wise refinement (11 candidates per interior point, non-adjacent points in parallel,
  common random numbers so the KLUB never rises), and subdivision 10 -> 20 -> 40 at log-midpoints
  (only the new points are optimised). Early stopping by a validation callable, as the KLUB
  optimum is not the KL optimum. The objective and its importance sampling live in :mod:`fastgen.samplers.klub`.

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
from fastgen.core.solvers import steps_for_nfe
from fastgen.samplers.klub import klub_intervals
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
    init: str = "auto",
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
            point on the refinement path by validation score is kept (early stopping at a quarter
            of a group update's resolution, the start included), else the last sweep.
        num_samples: Monte Carlo samples per KLUB estimate (redrawn each sweep).
        num_candidates: candidates per interior point, the current value included.
        init: "karras" (EDM rho = 7, continuous models), "loglinear", or "auto" (default): the
            better of the two by ``validate``, Karras without a validator.
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
    n = _check_args(data, n, solver, nfe, subdivisions, iterations, num_samples, num_candidates, class_labels)
    if validate is None and val_noise > 0:
        validate = _builtin_validator(denoiser, data, class_labels, solver, nfe, val_noise, hi, generator, cond)
    t, init = _start(init, n, lo, hi, validate)
    history: list[dict[str, float]] = []
    bar = tqdm(total=iterations * (subdivisions + 1), desc="AYS", disable=not progress, leave=False)
    klub = float("nan")
    for level in range(subdivisions + 1):
        if level > 0:
            t = _subdivide(t)
            groups = [torch.arange(1, t.shape[0] - 1, 2)]  # only the new points, all non-adjacent
        else:
            interior = torch.arange(1, t.shape[0] - 1)
            groups = [interior[0::2], interior[1::2]]
        sampler = _Sampler(data, class_labels, num_samples, generator, cond)
        t, klub = _optimise_level(denoiser, t, groups, num_candidates, iterations, sampler, validate,
                                  level, history, bar)
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
            "init": init,
            "history": history[-6:],
        },
    )


def _check_args(data, n, solver, nfe, subdivisions, iterations, num_samples, num_candidates, class_labels
                ) -> int:
    """Validate :func:`optimize_ays`' arguments; returns the first level's step count ``n``."""
    if n is None:
        n = steps_for_nfe(solver, nfe, exact=False) if solver is not None and nfe is not None else 10
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
    return n


def _start(init: str, n: int, lo: float, hi: float, validate: Callable[[torch.Tensor], float] | None
           ) -> tuple[torch.Tensor, str]:
    """The first level's knots and the init used: ``"auto"`` is the better of Karras and log-linear by
    ``validate`` (Karras without one, the paper's start for continuous models)."""
    if init != "auto":
        return _initial_knots(init, n, lo, hi), init
    if validate is None:
        return _initial_knots("karras", n, lo, hi), "karras"
    scored = [(validate(_initial_knots(k, n, lo, hi).flip(0).clone()), k) for k in ("karras", "loglinear")]
    best = min(scored)[1]
    return _initial_knots(best, n, lo, hi), best


def _initial_knots(init: str, n: int, lo: float, hi: float) -> torch.Tensor:
    """``n + 1`` ascending knots from ``lo`` to ``hi`` (exact end points)."""
    if init == "karras":
        knots = karras(n + 1, lo, hi)[:-1]
    elif init == "loglinear":
        knots = torch.linspace(math.log(hi), math.log(lo), n + 1, dtype=torch.float64).exp()
    else:
        raise ValueError(f"init must be 'karras' or 'loglinear', got {init!r}")
    t = knots.flip(0).clone()  # ascending: t[0] = sigma_min, t[-1] = sigma_max
    t[0], t[-1] = lo, hi  # exact end points (rho-th powers round)
    return t


def _builtin_validator(denoiser, data, class_labels, solver, nfe, val_noise, hi, generator, cond
                       ) -> Callable[[torch.Tensor], float]:
    if solver is None or nfe is None:
        raise ValueError("val_noise > 0 needs solver and nfe (the schedule's use) for early stopping")
    vdtype = data.dtype if data.dtype in (torch.float32, torch.float64) else torch.float32
    vcond = dict(cond)
    if class_labels is not None:
        pick = torch.randint(0, data.shape[0], (val_noise,), generator=generator)
        vcond["class_labels"] = class_labels[pick]
    return ode_validator(denoiser, data.shape[1:], solver, nfe, val_noise, hi, generator, dtype=vdtype, **vcond)


def _subdivide(t: torch.Tensor) -> torch.Tensor:
    """Insert the log-midpoint between every pair of neighbouring knots."""
    mids = (0.5 * (t[:-1].log() + t[1:].log())).exp()
    new = torch.empty(2 * t.shape[0] - 1, dtype=torch.float64)
    new[0::2], new[1::2] = t, mids
    return new


class _Sampler:
    """Fresh forward-process draws ``(x0, eps, eps2, u, cond)`` of ``num_samples`` per call."""

    def __init__(self, data, labels, m, generator, cond):
        self.data, self.labels, self.m, self.generator, self.cond = data, labels, m, generator, cond

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        x0, eps, eps2, u, cnd = _draw(self.data, self.labels, self.m, self.generator)
        return x0, eps, eps2, u, {**self.cond, **cnd}


def _optimise_level(denoiser, t, groups, num_candidates, iterations, sampler, validate, level, history, bar
                    ) -> tuple[torch.Tensor, float]:
    """Coordinate-wise sweeps over ``groups`` of non-adjacent knots. Returns (knots, last KLUB).

    Early stopping (with ``validate``): the schedules after every group update form a path from the
    level's start; the path is scored at :data:`PATH_FRACTIONS` of each leg (log-sigma interpolation
    between consecutive points) and the best point on it is kept, the start included, so the result is
    never worse than the start on the validation score. Each sweep moves every point to its local KLUB
    argmin, so a sweep is too coarse a unit to stop at: the KLUB optimum is not the ODE optimum, and
    scoring whole sweeps overshoots. Without ``validate`` the last sweep is kept.
    """
    path = [t.clone()]
    klub = float("nan")
    for it in range(iterations):
        for grp in groups:
            if grp.numel() == 0:
                continue
            x0, eps, eps2, u, cnd = sampler()
            t = _refine_group(denoiser, t, grp, num_candidates, x0, eps, eps2, u, cnd)
            path.append(t.clone())
        x0, eps, eps2, u, cnd = sampler()
        klub = float(klub_intervals(denoiser, t[:-1], t[1:], x0, eps, eps2, u, cnd).sum())
        history.append({"level": level, "iteration": it, "klub": klub})
        bar.update(1)
        bar.set_postfix(level=level, klub=f"{klub:.4g}")
    if validate is None:
        return t, klub
    best_t, best_score, best_at = path[0], validate(path[0].flip(0).clone()), 0.0
    for leg, (a, b) in enumerate(zip(path[:-1], path[1:])):
        for f in PATH_FRACTIONS:
            cand = (torch.lerp(a.log(), b.log(), f)).exp()
            cand[0], cand[-1] = a[0], a[-1]
            score = validate(cand.flip(0).clone())
            if score < best_score:
                best_t, best_score, best_at = cand, float(score), leg + f
    history.append({"level": level, "best_score": best_score, "path_position": best_at,
                    "path_length": len(path) - 1})
    return best_t, klub


#: Where each leg of the refinement path is scored for early stopping (fractions of the leg).
PATH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


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
    ``steps_for_nfe(solver, nfe, exact=False)`` steps and the final knot replaced by 0 (Diffusers' convention)."""
    steps = steps_for_nfe(solver, nfe, exact=False)
    knots = loglinear_interp(schedule.sigmas[schedule.sigmas > 0], steps + 1) if steps >= 1 else None
    if steps < 2:
        sig = torch.stack([schedule.sigmas[0], schedule.sigmas.new_zeros(())])
    else:
        sig = torch.cat([knots[:-1], knots.new_zeros(1)])
    return Schedule(sig, method=schedule.method, solver=solver, nfe=nfe, model=schedule.model,
                    objective=schedule.objective, meta={**schedule.meta, "resampled_from": schedule.steps})


def ode_validator(denoiser: Callable[..., torch.Tensor], shape: tuple[int, ...], solver: str, nfe: int,
                  num: int, sigma_max: float, generator: torch.Generator | None,
                  dtype: torch.dtype = torch.float64, noise: torch.Tensor | None = None,
                  reference: torch.Tensor | None = None, **cond: Any) -> Callable[[torch.Tensor], float]:
    """``f(knots) -> endpoint RMSE`` of ``solver`` at ``nfe`` on ``num`` fixed noises vs the reference ODE.

    ``noise`` (num, *shape) and its exact endpoints ``reference`` may be given (shared by several
    validators); otherwise they are drawn from ``generator`` and solved here."""
    from fastgen.core.ode import reference_solve
    from fastgen.samplers.schedule import endpoint_rmse

    if noise is None:
        noise = torch.randn(num, *shape, generator=generator, dtype=torch.float64).to(dtype)
    ref = reference_solve(denoiser, noise * sigma_max, sigma_max, 0.0, **cond) if reference is None else reference

    def score(knots: torch.Tensor) -> float:
        sched = for_solver(Schedule(knots), solver, nfe)
        return endpoint_rmse(denoiser, sched, noise, ref, solver, **cond)

    return score
