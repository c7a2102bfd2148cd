"""Choose the solver and the schedule together: the best pair for one model and NFE by held-out error.

:func:`auto_schedule` builds, for every solver, the closed-form schedules (Karras, log-linear) and the
optimised ones (DP always; LD3 optionally, initialised from the DP result), each within the NFE
budget (:func:`fastgen.core.solvers.steps_for_nfe` with ``exact=False``), and scores each by the
endpoint RMSE to the exact ODE on *held-out* noises that no optimiser saw. The winner is returned as
a :class:`~fastgen.samplers.schedule.Schedule` whose ``meta["auto"]`` ranks every candidate and
records the runner-up margins (error ratios to the winner, > 1).

Method ``"learned"`` (:mod:`fastgen.samplers.learned_solver`) adds, per NFE, learned solvers: after the
other candidates are scored, the best candidate of each of the ``learned_bases`` best one-call solvers
is the starting point of :func:`~fastgen.samplers.learned_solver.learn_solver` (schedule + combination
coefficients fitted on the fit noises, early-stopped on a split of them, never on the held-out
noises), and each result is scored on the held-out noises like every other candidate. By default two
option sets run from each base (:data:`DEFAULT_LEARNED_OPTIONS`): the defaults and half their learning
rates for 300 iterations: at NFE 10 on the digits teacher the defaults' first Adam steps can overshoot
so that the early stop keeps the base unchanged. The held-out error picks, as for every other candidate;
``benchmarks/bench_schedules.py`` measured the digits-teacher NFE-10 ratio to the best Diffusers
scheduler at 0.41 with one option set and 0.37 with the two.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastgen.core.ode import reference_solve
from fastgen.core.schedules import karras, loglinear
from fastgen.core.solvers import SOLVERS, steps_for_nfe
from fastgen.samplers.dp import dp_schedules
from fastgen.samplers.ld3 import LD3Options, ld3_steps, learn_ld3
from fastgen.samplers.learned_solver import COMBINABLE_SOLVERS, LearnedSolverOptions, learn_solver
from fastgen.samplers.optim_common import resolve_sigma_range
from fastgen.samplers.schedule import Schedule, endpoint_rmse

__all__ = ["auto_schedule", "auto_schedules", "METHODS", "DEFAULT_LEARNED_OPTIONS"]

#: Schedule kinds :func:`auto_schedule` can try.
METHODS = ("karras", "loglinear", "dp", "ld3", "learned")
#: The learned-solver option sets auto tries from each base (module docstring).
DEFAULT_LEARNED_OPTIONS = (LearnedSolverOptions(), LearnedSolverOptions(lr=0.01, lr_schedule=0.005, iterations=300))


def _candidates(denoiser, solver, nfes, noise, lo, hi, methods, dp_options, ld3_options, generator, targets,
                cond) -> dict[int, list[Schedule]]:
    """Every candidate of ``solver`` at each NFE in ``nfes``: DP from one teacher pass for all NFEs, LD3
    on the shared teacher ``targets`` (endpoints of ``noise``)."""
    out: dict[int, list[Schedule]] = {n: [] for n in nfes}
    dps: dict[int, Schedule] = {}
    if "dp" in methods or "ld3" in methods:
        # the closed-form schedules are candidates of their own here, so DP keeps to its own paths
        dps = dp_schedules(denoiser, noise, list(nfes), solver=solver, sigma_min=lo, sigma_max=hi, progress=False,
                           **{"uniform_candidate": False, **(dp_options or {})}, **cond)
    opts = ld3_options or LD3Options()
    for nfe in nfes:
        steps = steps_for_nfe(solver, nfe, exact=False)
        if steps >= 1 and "karras" in methods:
            out[nfe].append(Schedule(karras(steps, lo, hi), method="karras", solver=solver, nfe=nfe))
        if steps >= 1 and "loglinear" in methods:
            out[nfe].append(Schedule(loglinear(steps, lo, hi), method="loglinear", solver=solver, nfe=nfe))
        dp = dps.get(nfe)
        if "dp" in methods:
            out[nfe].append(dp)
        if "ld3" in methods and ld3_steps(solver, nfe) >= 2:
            # from the DP schedule where the step counts agree (Heun at an odd NFE: LD3 has nfe // 2 steps)
            init = dp if dp is not None and dp.steps == ld3_steps(solver, nfe) else opts.init
            out[nfe].append(learn_ld3(denoiser, noise, solver=solver, nfe=nfe, options=opts, init=init,
                                      sigma_min=lo, sigma_max=hi, targets=targets, generator=generator,
                                      progress=False, **cond))
    return out


def auto_schedule(
    denoiser: Callable[..., torch.Tensor],
    nfe: int,
    noise: torch.Tensor,
    held_out: torch.Tensor,
    *,
    solvers: Sequence[str] | None = None,
    methods: Sequence[str] = ("karras", "loglinear", "dp"),
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    dp_options: dict[str, Any] | None = None,
    ld3_options: LD3Options | None = None,
    learned_options: LearnedSolverOptions | Sequence[LearnedSolverOptions] | None = None,
    learned_bases: int = 3,
    generator: torch.Generator | None = None,
    model_id: str | None = None,
    held_out_cond: dict[str, Any] | None = None,
    **cond: Any,
) -> Schedule:
    """The best (solver, schedule) for ``denoiser`` at ``nfe`` calls by held-out trajectory error.

    Args:
        noise: (B, ...) unit Gaussian noises the optimisers (DP, LD3) fit on.
        held_out: (H, ...) other unit noises; every candidate is scored by the endpoint RMSE of its
            solver from ``held_out * sigma_max`` to the exact ODE endpoint (adaptive reference solve).
        solvers: names from :data:`fastgen.core.solvers.SOLVERS` (default: all).
        methods: subset of :data:`METHODS`; "ld3" starts from the DP schedule where the step counts
            agree (LD3 gives Heun ``nfe // 2`` steps), else from ``ld3_options.init``.
        dp_options: keyword arguments for :func:`fastgen.samplers.dp.dp_schedules` (e.g. ``grid_size``).
        learned_options / learned_bases: with "learned" in ``methods``, the options of
            :func:`~fastgen.samplers.learned_solver.learn_solver` (one set, or several: each runs from
            every base; default :data:`DEFAULT_LEARNED_OPTIONS`) and how many one-call solvers (their
            best candidate each, by held-out error) it starts from (>= 1).
        cond: conditioning of the fitting calls (per-sample tensors match ``noise``, e.g. ``class_labels``).
        held_out_cond: conditioning of the held-out scoring calls (per-sample tensors match
            ``held_out``); default ``cond`` (right for unconditional or shared conditioning).
    Returns the winner; ``meta["auto"]`` holds ``ranking`` (``[solver, method, error]`` best first),
    ``runner_up`` (``[solver, method]`` of the second) and ``runner_up_margin`` (its error / the best;
    inf if only one candidate) and
    ``margins`` (per other solver: its best error / the winner's).
    """
    return auto_schedules(denoiser, [nfe], noise, held_out, solvers=solvers, methods=methods, sigma_min=sigma_min,
                          sigma_max=sigma_max, dp_options=dp_options, ld3_options=ld3_options,
                          learned_options=learned_options, learned_bases=learned_bases, generator=generator,
                          model_id=model_id, held_out_cond=held_out_cond, **cond)[nfe]


def auto_schedules(
    denoiser: Callable[..., torch.Tensor],
    nfes: Sequence[int],
    noise: torch.Tensor,
    held_out: torch.Tensor,
    *,
    solvers: Sequence[str] | None = None,
    methods: Sequence[str] = ("karras", "loglinear", "dp"),
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    dp_options: dict[str, Any] | None = None,
    ld3_options: LD3Options | None = None,
    learned_options: LearnedSolverOptions | Sequence[LearnedSolverOptions] | None = None,
    learned_bases: int = 3,
    generator: torch.Generator | None = None,
    model_id: str | None = None,
    held_out_cond: dict[str, Any] | None = None,
    held_out_reference: torch.Tensor | None = None,
    **cond: Any,
) -> dict[int, Schedule]:
    """:func:`auto_schedule` for several NFE budgets at once: ``{nfe: winner}``. One reference solve of
    the held-out noises, one of the fitting noises (LD3's teacher) and one DP teacher pass per solver
    serve every NFE. ``held_out_reference``: the exact endpoints of ``held_out`` if already solved."""
    t0 = time.perf_counter()
    solvers = list(SOLVERS) if solvers is None else list(solvers)
    unknown = [s for s in solvers if s not in SOLVERS] + [m for m in methods if m not in METHODS]
    if unknown or not solvers or not methods:
        raise ValueError(f"solvers must be among {sorted(SOLVERS)} and methods among {METHODS}, got "
                         f"{solvers!r}, {list(methods)!r}")
    for name, t in (("noise", noise), ("held_out", held_out)):
        if not isinstance(t, torch.Tensor) or t.ndim < 2 or t.shape[0] < 2:
            raise ValueError(f"{name} must be a tensor of shape (N, ...) with N >= 2")
    if isinstance(learned_bases, bool) or not isinstance(learned_bases, int) or learned_bases < 1:
        raise ValueError(f"learned_bases must be an integer >= 1, got {learned_bases!r}")
    variants = (DEFAULT_LEARNED_OPTIONS if learned_options is None else (learned_options,)
                if isinstance(learned_options, LearnedSolverOptions)
                else tuple(learned_options) if isinstance(learned_options, (list, tuple)) else ())
    if not variants or not all(isinstance(v, LearnedSolverOptions) for v in variants):
        raise ValueError("learned_options must be a LearnedSolverOptions or a non-empty sequence of them, got "
                         f"{learned_options!r}")
    for v in variants:
        v.check()
    nfes = list(nfes)
    for n in nfes:
        steps_for_nfe("euler", n)  # ValueError for a non-integer or < 1
    lo, hi = resolve_sigma_range(denoiser, sigma_min, sigma_max)
    hcond = cond if held_out_cond is None else held_out_cond
    with torch.no_grad():
        reference = (reference_solve(denoiser, held_out * hi, hi, 0.0, **hcond) if held_out_reference is None
                     else held_out_reference)
        targets = (reference_solve(denoiser, noise * hi, hi, 0.0, **cond)
                   if "ld3" in methods or "learned" in methods else None)
    scored: dict[int, list[tuple[float, str, Schedule]]] = {n: [] for n in nfes}
    for solver in solvers:
        cands = _candidates(denoiser, solver, nfes, noise, lo, hi, methods, dp_options, ld3_options, generator,
                            targets, cond)
        for nfe, cs in cands.items():
            scored[nfe] += [(endpoint_rmse(denoiser, c, held_out, reference, **hcond), solver, c) for c in cs]
    if "learned" in methods:
        for nfe in nfes:
            for base in _learned_bases(scored[nfe], learned_bases):
                for opts in variants:
                    c = learn_solver(denoiser, noise, base, targets=targets, options=opts, sigma_min=lo,
                                     sigma_max=hi, generator=generator, progress=False, **cond)
                    scored[nfe].append((endpoint_rmse(denoiser, c, held_out, reference, **hcond), c.solver, c))
    seconds = round(time.perf_counter() - t0, 3)
    return {nfe: _winner(sorted(sc, key=lambda item: item[0]), model_id, held_out, noise, seconds)
            for nfe, sc in scored.items()}


def _learned_bases(scored: list[tuple[float, str, Schedule]], k: int) -> list[Schedule]:
    """The best-scored candidate of each of the ``k`` best one-call solvers (starting points of the
    learned solver); schedules with fewer than 2 steps are skipped."""
    out: dict[str, Schedule] = {}
    for _, solver, c in sorted(scored, key=lambda item: item[0]):
        if solver in COMBINABLE_SOLVERS and solver not in out and c.steps >= 2 and len(out) < k:
            out[solver] = c
    return list(out.values())


def _winner(scored: list[tuple[float, str, Schedule]], model_id: str | None, held_out: torch.Tensor,
            noise: torch.Tensor, seconds: float) -> Schedule:
    """The best of ``scored`` (sorted ``(error, solver, schedule)``) with the ranking and margins in its meta."""
    best_err, best_solver, best = scored[0]
    per_solver: dict[str, float] = {}
    for err, solver, _ in scored:
        per_solver.setdefault(solver, err)
    tiny = max(best_err, 1e-300)
    best.model = model_id
    best.meta = {**best.meta, "auto": {
        "held_out_error": best_err,
        "ranking": [[s, c.method, e] for e, s, c in scored],
        "runner_up": [scored[1][1], scored[1][2].method] if len(scored) > 1 else None,
        "runner_up_margin": scored[1][0] / tiny if len(scored) > 1 else float("inf"),
        "margins": {s: e / tiny for s, e in per_solver.items() if s != best_solver},
        "optimization_seconds": {f"{s}/{c.method}": c.meta.get("optimization_seconds", 0.0) for _, s, c in scored},
        "held_out": int(held_out.shape[0]), "fit_noises": int(noise.shape[0]),
        "seconds": seconds,
    }}
    return best
