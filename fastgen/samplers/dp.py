"""GITS / BOSS-style dynamic programming schedules (Chen et al. ICML 2024; BOSS).

1. Solve the ODE accurately on a fine grid of ``K + 1`` sigmas (Karras rho = 7 from ``sigma_max``
   to ``sigma_min``, then 0) for a few hundred noises: teacher states ``X[0..K]``.
2. Cost ``C[i, j]`` (i < j): one coarse step (Euler with the teacher's derivative by default, or
   Heun) from ``X[i]`` at ``sigma_i`` to ``sigma_j``, compared with ``X[j]`` by a metric averaged over
   noises (see :data:`METRICS`). GITS' own costs: ``"l2"`` (per-sample L2 norm), ``"l1"`` (per-sample
   mean absolute error: GITS' L1 norm divided by the dimension, so the same schedules) and ``"dev"``
   (signed difference of the batch-mean deviations from the straight line between ``X[0]`` and
   ``X[K]``). fastgen's variants: ``"mse"`` (mean squared error) and ``"abs_dev"`` (mean absolute
   difference of the per-sample deviations).
3. Dynamic programming ``V[k][i] = min_{j > i} C[i, j] + coeff * V[k-1][j]`` with
   ``V[1][i] = C[i, K]``: the cheapest path from ``sigma_max`` to 0 in exactly ``k`` steps, for every
   ``k`` up to the largest requested at once (O(k K^2)). ``coeff = 1`` is BOSS; GITS uses 1.15-1.2.

A path always ends with a step to 0, so the schedules are ready for a solver; the number of steps
for an NFE budget follows :func:`fastgen.samplers.schedule.steps_within_nfe`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastgen.core.ode import reference_trajectory
from fastgen.core.schedules import flow_uniform, karras, loglinear
from fastgen.core.solvers import get_solver
from fastgen.samplers.optim_common import resolve_sigma_range
from fastgen.samplers.schedule import Schedule, steps_within_nfe

#: Cost metrics: GITS' ``l2``, ``l1``, ``dev`` and fastgen's ``mse``, ``abs_dev`` (see :func:`step_metric`).
METRICS = ("l2", "l1", "dev", "mse", "abs_dev")
COST_STEPS = ("euler", "heun")
#: Coefficients tried by ``coeff="auto"`` (1.0 is BOSS; GITS uses 1.15-1.2).
AUTO_COEFFS = (1.0, 1.1, 1.2, 1.35, 1.5, 2.0)
#: The fine grids DP picks its steps from: name -> (K, sigma_min, sigma_max, rho) -> K sigmas + 0.
GRIDS: dict[str, Callable[[int, float, float, float], torch.Tensor]] = {
    "karras": lambda k, lo, hi, rho: karras(k, lo, hi, rho=rho),
    "loglinear": lambda k, lo, hi, rho: loglinear(k, lo, hi),
    "flow": lambda k, lo, hi, rho: flow_uniform(k, lo, hi),
}


def dp_select_all(
    cost: torch.Tensor, max_steps: int, coeff: float = 1.0
) -> dict[int, tuple[list[int], float]]:
    """Optimal paths ``0 -> K`` through a (K+1, K+1) cost matrix (entries i < j used), for every step
    count 1..max_steps: ``{steps: (node indices incl. 0 and K, total cost)}``.

    The total cost of a path ``p`` is ``sum_m coeff**m * C[p_m, p_{m+1}]``.
    """
    cost = torch.as_tensor(cost, dtype=torch.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] < 2:
        raise ValueError(f"cost must be a square (K+1, K+1) matrix with K >= 1, got {tuple(cost.shape)}")
    k_last = cost.shape[0] - 1
    if not isinstance(max_steps, int) or not 1 <= max_steps <= k_last:
        raise ValueError(f"max_steps must be an integer in [1, {k_last}] (grid intervals), got {max_steps!r}")
    if coeff <= 0:
        raise ValueError(f"coeff must be > 0, got {coeff}")
    inf = math.inf
    upper = torch.triu(torch.ones_like(cost, dtype=torch.bool), diagonal=1)
    c = torch.where(upper, cost, torch.full_like(cost, inf))
    v = torch.full((max_steps + 1, k_last + 1), inf, dtype=torch.float64)
    arg = torch.full((max_steps + 1, k_last + 1), -1, dtype=torch.long)
    v[1, :k_last] = c[:k_last, k_last]
    arg[1, :k_last] = k_last
    for k in range(2, max_steps + 1):
        total = c + coeff * v[k - 1][None, :]  # (i, j)
        best, j = total.min(1)
        v[k], arg[k] = best, j
    out: dict[int, tuple[list[int], float]] = {}
    for k in range(1, max_steps + 1):
        if not math.isfinite(float(v[k, 0])):
            continue
        path, i = [0], 0
        for kk in range(k, 0, -1):
            i = int(arg[kk, i])
            path.append(i)
        out[k] = (path, float(v[k, 0]))
    return out


def dp_select(cost: torch.Tensor, steps: int, coeff: float = 1.0) -> list[int]:
    """Node indices (0 ... K) of the cheapest ``steps``-step path; see :func:`dp_select_all`."""
    return dp_select_all(cost, steps, coeff)[steps][0]


def brute_force_select(cost: torch.Tensor, steps: int, coeff: float = 1.0) -> tuple[list[int], float]:
    """Exhaustive search over all paths (for testing :func:`dp_select`; K <= ~14)."""
    k_last = cost.shape[0] - 1
    best: tuple[list[int], float] = ([], math.inf)
    for mid in itertools.combinations(range(1, k_last), steps - 1):
        path = [0, *mid, k_last]
        tot = sum(coeff**m * float(cost[path[m], path[m + 1]]) for m in range(steps))
        if tot < best[1]:
            best = (path, tot)
    return best


def step_metric(pred: torch.Tensor, target: torch.Tensor, metric: str, start: torch.Tensor, end: torch.Tensor
                ) -> torch.Tensor:
    """Per-sample cost (B,) between (B, d) tensors; ``start``/``end`` (B, d) define GITS' line.

    The batch mean of this is the cost matrix entry. GITS (Chen et al. 2024, ``get_dp_list``):
    ``"l2"``: ``||pred - target||_2``; ``"l1"``: ``mean |pred - target|``; ``"dev"``:
    ``dev(pred) - dev(target)``, signed, whose batch mean is GITS' difference of mean deviations
    (``dev(y)``: norm of ``y - start`` orthogonal to ``end - start``). fastgen's variants:
    ``"mse"``: ``mean (pred - target)^2``; ``"abs_dev"``: ``|dev(pred) - dev(target)|``.
    """
    if metric == "l2":
        return (pred - target).norm(dim=1)
    if metric == "mse":
        return ((pred - target) ** 2).mean(1)
    if metric == "l1":
        return (pred - target).abs().mean(1)
    u = end - start
    u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-20)

    def dev(y: torch.Tensor) -> torch.Tensor:
        r = y - start
        return (r - (r * u).sum(1, keepdim=True) * u).norm(dim=1)

    diff = dev(pred) - dev(target)
    return diff if metric == "dev" else diff.abs()


def cost_matrix(
    denoiser: Callable[..., torch.Tensor],
    grid: torch.Tensor,
    states: torch.Tensor,
    *,
    metric: str = "mse",
    cost_step: str = "euler",
    progress: bool = False,
    **cond: Any,
) -> torch.Tensor:
    """(K+1, K+1) cost of one coarse step between grid nodes; ``states`` (K+1, B, ...) teacher states
    at ``grid`` (K+1 sigmas ending in 0). Entries with i >= j are +inf."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if cost_step not in COST_STEPS:
        raise ValueError(f"cost_step must be one of {COST_STEPS}, got {cost_step!r}")
    kp1 = grid.shape[0]
    flat = states.reshape(kp1, states.shape[1], -1).double()
    start, end = flat[0], flat[-1]
    cost = torch.full((kp1, kp1), math.inf, dtype=torch.float64)
    dtype = states.dtype
    with torch.no_grad():
        for i in tqdm(range(kp1 - 1), desc="DP cost", disable=not progress, leave=False):
            s_i = grid[i]
            x_i = states[i]
            d_i = denoiser(x_i, s_i.to(dtype), **cond).double().reshape(x_i.shape[0], -1)
            xi = flat[i]
            for j in range(i + 1, kp1):
                s_j = grid[j]
                pred = d_i + (s_j / s_i) * (xi - d_i)  # Euler step in VE = DDIM
                if cost_step == "heun" and float(s_j) > 0:
                    d_j = denoiser(pred.reshape(x_i.shape).to(dtype), s_j.to(dtype), **cond).double()
                    d_j = d_j.reshape(x_i.shape[0], -1)
                    slope = 0.5 * ((xi - d_i) / s_i + (pred - d_j) / s_j)
                    pred = xi + (s_j - s_i) * slope
                cost[i, j] = float(step_metric(pred, flat[j], metric, start, end).mean())
    return cost


def dp_schedules(
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    nfes: Sequence[int],
    *,
    solver: str = "dpmpp_2m",
    grid_size: int = 40,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    grid: str = "karras",
    uniform_candidate: bool = True,
    metric: str | Sequence[str] = ("mse", "abs_dev"),
    cost_step: str = "euler",
    coeff: float | Sequence[float] | str = "auto",
    class_labels: torch.Tensor | None = None,
    rtol: float = 1e-5,
    progress: bool = True,
    model_id: str | None = None,
    **cond: Any,
) -> dict[int, Schedule]:
    """DP schedules for ``solver`` at every NFE in ``nfes``, from one teacher solve.

    Args:
        noise: (B, ...) unit Gaussian noises; the teacher starts at ``noise * sigma_max``.
        grid_size: K, the fine grid's intervals (K sigmas from ``sigma_max`` to ``sigma_min``, then 0).
        grid: how the fine grid spaces them (:data:`GRIDS`): ``"karras"`` (rho ``rho``, GITS' choice),
            ``"loglinear"`` (uniform in log sigma) or ``"flow"`` (uniform in flow time t = sigma / (1 + sigma),
            a flow-matching pipeline's own spacing).
        metric: one of :data:`METRICS` or several (one cost matrix each). The default, fastgen's
            ``("mse", "abs_dev")``, is what the schedules in BENCHMARKS.md used; ``("l2", "dev")`` are GITS'.
        cost_step: the coarse step of the cost ("euler" as in GITS/BOSS, or "heun").
        coeff: the GITS coefficient (``1.0`` is BOSS), a list of them, or ``"auto"``
            (= ``AUTO_COEFFS``). With several (metric, coeff) choices, each gives a path per step
            count and the one whose ``solver`` endpoint is closest to the teacher's on these noises
            is kept: a cheap, solver-aware choice, as single-step costs ignore how multistep solvers
            (DPM-Solver++(2M), iPNDM) propagate error. The grid's uniform subsample (every K/n-th point;
            with ``grid="flow"`` a flow pipeline's own spacing, metric ``"uniform"``) is always one more
            candidate, so the result is never worse than it on these noises (``uniform_candidate=False``:
            DP's own paths only, as BOSS defines its steps).
    Returns ``{nfe: Schedule}`` (each ends in 0; ``objective`` is the teacher-endpoint RMSE of the
    chosen path on the given noises, ``meta`` the DP cost, metric and coefficient).
    """
    t_start = time.perf_counter()
    solve = get_solver(solver)
    if not nfes:
        raise ValueError("nfes must name at least one NFE budget")
    steps = {int(n): steps_within_nfe(solver, int(n)) for n in nfes}
    if not isinstance(grid_size, int) or grid_size < 2:
        raise ValueError(f"grid_size must be an integer >= 2, got {grid_size!r}")
    if max(steps.values()) > grid_size:
        raise ValueError(f"grid_size={grid_size} is smaller than the {max(steps.values())} steps requested")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2 or noise.shape[0] < 1:
        raise ValueError("noise must be a tensor of shape (B, ...) with B >= 1")
    metrics = [metric] if isinstance(metric, str) else list(metric)
    coeffs = list(AUTO_COEFFS) if coeff == "auto" else ([float(coeff)] if isinstance(coeff, (int, float))
                                                         else [float(c) for c in coeff])
    if not metrics or not coeffs:
        raise ValueError("metric and coeff must name at least one choice each")
    lo, hi = resolve_sigma_range(denoiser, sigma_min, sigma_max)
    if class_labels is not None:
        cond = {**cond, "class_labels": class_labels}
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {tuple(GRIDS)}, got {grid!r}")
    grid_kind, grid = grid, GRIDS[grid](grid_size, lo, hi, rho)
    states = reference_trajectory(denoiser, noise * hi, grid.to(noise.dtype), rtol=rtol, atol=rtol,
                                  sigma_floor=min(1e-4, lo / 2), **cond)
    candidates: dict[int, list[tuple[list[int], float, str, float]]] = {n: [] for n in steps}
    for met in metrics:
        cost = cost_matrix(denoiser, grid.to(noise.dtype), states, metric=met, cost_step=cost_step,
                           progress=progress, **cond)
        for c in coeffs:
            paths = dp_select_all(cost, max(steps.values()), c)
            for n, k in steps.items():
                if k in paths:
                    candidates[n].append((paths[k][0], paths[k][1], met, c))

    for n, k in steps.items() if uniform_candidate else ():  # the grid's own uniform subsample
        uniform = sorted({round(i * grid_size / k) for i in range(k + 1)})
        if len(uniform) == k + 1:
            candidates[n].append((uniform, math.inf, "uniform", None))

    def endpoint_error(path: list[int]) -> float:
        with torch.no_grad():
            out = solve(denoiser, noise * hi, grid[path].to(noise.dtype), **cond)
        return float(((out.double() - states[-1].double()) ** 2).mean().sqrt())

    scores: dict[tuple[int, ...], float] = {}
    out = {}
    for n, cands in candidates.items():
        path, total, met, c, score = _pick(cands, endpoint_error, scores)
        out[n] = Schedule(
            grid[path], method="dp", solver=solver, nfe=n, model=model_id, objective=score,
            meta={"objective_name": "endpoint RMSE to the teacher on the DP noises (nan: single candidate)",
                  "dp_cost": total if math.isfinite(total) else None, "metric": met, "cost_step": cost_step,
                  "coeff": c,
                  "grid_size": grid_size, "grid": grid_kind, "grid_indices": path, "sigma_min": lo, "sigma_max": hi,
                  "samples": int(noise.shape[0]),
                  "optimization_seconds": round(time.perf_counter() - t_start, 3)},
        )
    return out


def _pick(cands: list[tuple[list[int], float, str, float]], endpoint_error: Callable[[list[int]], float],
          scores: dict[tuple[int, ...], float]) -> tuple[list[int], float, str, float, float]:
    """The candidate path with the smallest solver endpoint error (ties: DP cost); with one distinct
    path, no solve and score nan. ``scores`` caches errors across NFEs. Returns (path, cost, metric,
    coeff, score)."""
    if len({tuple(p) for p, *_ in cands}) == 1:
        path, total, met, c = min(cands, key=lambda cand: cand[1])
        return path, total, met, c, math.nan
    for p, *_ in cands:
        if tuple(p) not in scores:
            scores[tuple(p)] = endpoint_error(p)
    path, total, met, c = min(cands, key=lambda cand: (scores[tuple(cand[0])], cand[1]))
    return path, total, met, c, scores[tuple(path)]


def dp_schedule(
    denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, nfe: int, **kwargs: Any
) -> Schedule:
    """One DP schedule; see :func:`dp_schedules`."""
    return dp_schedules(denoiser, noise, [nfe], **kwargs)[int(nfe)]
