"""A learned few-step solver: schedule and multistep combination coefficients fitted together.

In the spirit of S4S ("Solving for a diffusion model solver", Frankel et al. 2025) and bespoke /
learned linear-multistep solvers: for one NFE budget, start from an existing one-call solver on an
existing schedule (e.g. the DP or LD3 winner of :func:`fastgen.samplers.auto.auto_schedules`) and
learn, by gradient descent on the endpoint error to the exact ODE, small corrections to it.

What is learned (the contract):

- **schedule**: LD3's knot logits (:func:`fastgen.samplers.ld3.logits_to_knots`; VE sigmas, strictly
  decreasing from ``sigma_max`` and >= ``sigma_min``, final step to 0; a base whose last positive
  sigma is ``sigma_min`` keeps it there) and, with ``decoupled``, LD3's evaluation offsets (log-sigma,
  clamped to half the smallest log gap; stored as ``eval_sigmas``);
- **combination coefficients** ``C`` of shape ``(steps, history)``: at step ``i`` the base solver is
  handed, instead of the raw denoiser output ``D_i``, the combination

      D'_i = D_i + sum_{j < min(i, history)} C[i, j] * (D_{i-1-j} - D_i)

  of the raw outputs at the current and previous knots (``C[i, j] = 0`` where ``i - 1 - j < 0``). The
  base solver is linear in its denoiser outputs, so this re-weights its multistep coefficients
  (x_{i+1} = a_i x_i + sum_j b_ij D_j) under the consistency constraint that the weights of the D's
  keep their sum; ``C = 0`` is the base solver exactly. The step to 0 of every accepted base returns
  ``D'_{N-1}``, so the last row re-weights the final estimate directly.

The parameters are few (``steps * history`` + ``2 * steps``) and the corrections are fitted with an L2
penalty and early stopping on separate validation noises, so 48-64 fit noises do not overfit.
Replay needs no new solver: the learned schedule stores ``solver`` (the base), ``sigmas``,
``eval_sigmas`` and ``coefficients``, and :meth:`~fastgen.samplers.schedule.Schedule.wrap` returns the
:class:`~fastgen.samplers.schedule.CombinedDenoiser` the base solver runs with (``Schedule.sample``
and ``fastgen sample --schedule file.json`` do this).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from fastgen.core.solvers import get_solver
from fastgen.samplers.ld3 import logits_to_knots, rmse_distance, teacher_endpoints
from fastgen.samplers.optim_common import Patience, resolve_sigma_range, split_cond
from fastgen.samplers.schedule import COMBINABLE_SOLVERS, CombinedDenoiser, Schedule

__all__ = ["LearnedSolverOptions", "learn_solver", "COMBINABLE_SOLVERS"]


@dataclass
class LearnedSolverOptions:
    """Hyper-parameters of :func:`learn_solver`.

    - ``history``: previous denoiser outputs each step's combination may use (1-4).
    - ``final_row``: also learn the last step's combination (the final estimate ``D'_{N-1}``); False
      keeps the last denoiser output as it is (a sharper final estimate).
    - ``learn_schedule``: also move the knots (LD3 logits); ``decoupled``: also the evaluation offsets.
    - ``iterations``: Adam steps (full batch of the training noises, or minibatches of ``batch_size``).
    - ``lr``: Adam learning rate of the coefficients; ``lr_schedule``: of the logits and offsets.
    - ``loss``: "rmse" (mean of per-sample RMSEs, LD3's) or "global" (the RMSE over all samples and
      dimensions: the scoring metric, which weighs the few far-off endpoints more).
    - ``l2``: penalty ``l2 * sum(C**2)`` added to the loss.
    - ``patience``: validations without a new best before the best state is reloaded and both learning
      rates are halved; the run stops after ``max_reductions`` such reductions.
    - ``train_fraction``: share of ``noise`` that trains when no validation noises are given.
    - ``refit``: with that internal split, train again from the start on *all* of ``noise`` for the
      number of steps (and learning rates) that gave the best validation error.
    """

    history: int = 3
    final_row: bool = True
    learn_schedule: bool = True
    decoupled: bool = True
    iterations: int = 150
    lr: float = 0.02
    lr_schedule: float = 0.01
    loss: str = "rmse"
    l2: float = 1e-3
    patience: int = 5
    max_reductions: int = 3
    batch_size: int | None = None
    train_fraction: float = 0.5
    refit: bool = False

    def check(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"{name} must be {accepted}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.history) or not 1 <= self.history <= 4:
            raise bad("history", "an integer in 1..4")
        if not is_int(self.iterations) or self.iterations < 0:
            raise bad("iterations", "an integer >= 0")
        for name in ("lr", "lr_schedule"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise bad(name, "a finite number > 0")
        if isinstance(self.l2, bool) or not isinstance(self.l2, (int, float)) or not (math.isfinite(self.l2)
                                                                                     and self.l2 >= 0):
            raise bad("l2", "a finite number >= 0")
        if not is_int(self.patience) or self.patience < 1:
            raise bad("patience", "an integer >= 1")
        if not is_int(self.max_reductions) or self.max_reductions < 0:
            raise bad("max_reductions", "an integer >= 0")
        if self.batch_size is not None and (not is_int(self.batch_size) or self.batch_size < 1):
            raise bad("batch_size", "None or an integer >= 1")
        if isinstance(self.train_fraction, bool) or not 0 < self.train_fraction < 1:
            raise bad("train_fraction", "in (0, 1)")
        if self.loss not in ("rmse", "global"):
            raise bad("loss", "'rmse' or 'global'")
        for name in ("learn_schedule", "decoupled", "final_row", "refit"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")


_OPTION_NAMES = {f.name for f in fields(LearnedSolverOptions)}


def coefficient_mask(steps: int, history: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(steps, history) 0/1 mask: entry [i, j] is 1 iff output ``D_{i-1-j}`` exists (``j < i``)."""
    i = torch.arange(steps).unsqueeze(1)
    j = torch.arange(history).unsqueeze(0)
    return (j < i).to(dtype)


class _Learner:
    """The parameters (logits, offsets, coefficients) and the solve they define."""

    def __init__(self, denoiser, base: Schedule, lo: float, hi: float, opts: LearnedSolverOptions, dtype):
        self.denoiser, self.opts, self.lo, self.hi, self.dtype = denoiser, opts, lo, hi, dtype
        self.solver = base.solver
        self.solve = get_solver(base.solver)
        self.steps = base.steps
        pos = base.sigmas[:-1].double()
        # the last knot is pinned at sigma_min when the base ends there (a softmax gap cannot be 0);
        # otherwise LD3's slack gap down to sigma_min lets it move
        self.pinned = bool(pos[-1] <= lo * (1 + 1e-9))
        full = pos if self.pinned else torch.cat([pos, pos.new_tensor([lo])])
        gaps = full[:-1].log() - full[1:].log()
        self.logits = (gaps / gaps.sum()).log().requires_grad_(opts.learn_schedule)
        off = torch.zeros(self.steps + 1, dtype=torch.float64)
        if base.eval_sigmas is not None:
            off[1:-1] = base.eval_sigmas[1:-1].double().log() - pos[1:].log()
        self.offsets = off.requires_grad_(opts.learn_schedule and opts.decoupled)
        self.use_offsets = opts.decoupled or base.eval_sigmas is not None
        self.mask = coefficient_mask(self.steps, opts.history)
        if not opts.final_row:
            self.mask[-1] = 0
        self.coeffs = torch.zeros(self.steps, opts.history, dtype=torch.float64, requires_grad=True)
        groups = [{"params": [self.coeffs], "lr": opts.lr}]
        sched_params = [t for t in (self.logits, self.offsets) if t.requires_grad]
        if sched_params:
            groups.append({"params": sched_params, "lr": opts.lr_schedule})
        self.opt = torch.optim.Adam(groups)

    def build(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(solver sigmas ending in 0, evaluation sigmas or None, masked coefficients)."""
        knots = logits_to_knots(self.logits, self.lo, self.hi)
        pos = knots if self.pinned else knots[:-1]
        sig = torch.cat([pos, knots.new_zeros(1)])
        ev = None
        if self.use_offsets:
            width = 0.5 * float((pos[:-1].log() - pos[1:].log()).min().detach())
            mask = torch.ones_like(self.offsets)
            mask[0] = mask[-1] = 0
            ev = torch.cat([pos * torch.exp(self.offsets.clamp(-width, width) * mask)[:-1], knots.new_zeros(1)])
        return sig, ev, self.coeffs * self.mask

    def run(self, noise: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        sig, ev, c = self.build()
        den = CombinedDenoiser(self.denoiser, sig, ev, c)
        with warnings.catch_warnings():  # the solvers test float(sigma) == 0 on a tensor with grad
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            return self.solve(den, noise * self.hi, sig.to(noise.dtype), check_finite=False, **cond)

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.detach().clone() for t in (self.logits, self.offsets, self.coeffs))

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            for t, v in zip((self.logits, self.offsets, self.coeffs), state):
                t.copy_(v)


def _step(lr_: _Learner, noise: torch.Tensor, targets: torch.Tensor, cond: dict[str, Any],
          opts: LearnedSolverOptions, generator: torch.Generator | None) -> float:
    """One Adam step on (a minibatch of) ``noise``; returns the fit loss."""
    n = noise.shape[0]
    bs = n if opts.batch_size is None or opts.batch_size >= n else opts.batch_size
    idx = torch.randperm(n, generator=generator)[:bs] if bs < n else torch.arange(n)
    lr_.opt.zero_grad()
    out = lr_.run(noise[idx], split_cond(cond, n, idx))
    fit = (rmse_distance(out, targets[idx]).mean() if opts.loss == "rmse"
           else (out - targets[idx]).pow(2).mean().add(1e-20).sqrt())
    (fit + opts.l2 * (lr_.coeffs * lr_.mask).pow(2).sum()).backward()
    lr_.opt.step()
    return float(fit.detach())


def _check_base(base: Any) -> Schedule:
    if not isinstance(base, Schedule) or base.solver not in COMBINABLE_SOLVERS:
        got = base.solver if isinstance(base, Schedule) else type(base).__name__
        raise ValueError(f"base must be a Schedule whose solver is one of {list(COMBINABLE_SOLVERS)} (one denoiser "
                         f"call per step), got {got!r}")
    if not base.ends_in_zero or base.steps < 2:
        raise ValueError(f"base must end in 0 and have at least 2 steps, got {base.sigmas.tolist()}")
    if base.coefficients is not None:
        raise ValueError("base already has learned coefficients; start from its plain solver schedule")
    return base


def learn_solver(
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    base: Schedule,
    *,
    targets: torch.Tensor | None = None,
    val_noise: torch.Tensor | None = None,
    val_targets: torch.Tensor | None = None,
    val_cond: dict[str, Any] | None = None,
    options: LearnedSolverOptions | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    model_id: str | None = None,
    **kwargs: Any,
) -> Schedule:
    """Learn schedule + combination coefficients (module docstring) starting exactly at ``base``.

    Args:
        denoiser: VE denoiser ``D(x, sigma, **cond)``, differentiable in x and sigma.
        noise: (M, ...) unit Gaussian fit noises (``x_T = noise * sigma_max``).
        base: the starting schedule (a :class:`Schedule` ending in 0 whose solver is one of
            :data:`COMBINABLE_SOLVERS`; its ``eval_sigmas`` are kept as the initial offsets).
        targets: (M, ...) exact ODE endpoints of ``noise`` (default: adaptive reference solve).
        val_noise / val_targets / val_cond: validation noises for early stopping (default: a
            ``1 - train_fraction`` split of ``noise``); ``val_targets`` default to a reference solve.
        options: :class:`LearnedSolverOptions`; keyword arguments naming its fields override it;
            other keyword arguments are conditioning (per-sample tensors match ``noise``).

    Returns a :class:`Schedule` with ``method="learned"``, ``solver=base.solver``, ``nfe=base.nfe``,
    ``coefficients`` (steps, history) and ``eval_sigmas`` (if decoupled); ``objective`` is the best
    validation RMSE (never above the base's: the start is a candidate); ``meta`` holds the base's
    method, sigmas and eval sigmas (``base_method``, ``base_sigmas``, ``base_eval_sigmas``), its
    validation error (``initial_validation``), iterations and time.
    """
    t0 = time.perf_counter()
    opts = replace(options or LearnedSolverOptions(), **{k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_NAMES})
    opts.check()
    base = _check_base(base)
    cond = kwargs
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2 or noise.shape[0] < 2:
        raise ValueError("noise must be a tensor of shape (M, ...) with M >= 2")
    lo, hi = resolve_sigma_range(denoiser, sigma_min, sigma_max)
    if abs(float(base.sigmas[0]) - hi) > 1e-9 * hi:
        raise ValueError(f"base must start at sigma_max={hi:.6g}, got {float(base.sigmas[0]):.6g}")
    if targets is None:
        targets = teacher_endpoints(denoiser, noise * hi, hi, **cond)
    if targets.shape != noise.shape:
        raise ValueError(f"targets must have the shape of noise {tuple(noise.shape)}, got {tuple(targets.shape)}")
    m = noise.shape[0]
    full = (noise, targets, cond)
    internal = val_noise is None
    if internal:
        perm = torch.randperm(m, generator=generator)
        n_tr = min(max(1, int(round(m * opts.train_fraction))), m - 1)
        tr, va = perm[:n_tr], perm[n_tr:]
        val_noise, val_targets, val_cond = noise[va], targets[va], split_cond(cond, m, va)
        noise, targets, cond = noise[tr], targets[tr], split_cond(cond, m, tr)
    else:
        val_cond = cond if val_cond is None else val_cond
        if val_targets is None:
            val_targets = teacher_endpoints(denoiser, val_noise * hi, hi, **val_cond)
    lr_ = _Learner(denoiser, base, lo, hi, opts, noise.dtype)

    def validate() -> float:
        with torch.no_grad():
            return float(((lr_.run(val_noise, val_cond).double() - val_targets.double()) ** 2).mean().sqrt())

    stop = Patience(opts.patience)
    stop.update(validate())
    init_val, best = stop.best, lr_.snapshot()
    scale, scales, best_steps = 1.0, [], 0  # the learning-rate scale of every step; steps up to the best
    reductions, it_done = 0, 0
    bar = tqdm(range(opts.iterations), desc=f"learned {base.solver} nfe={base.nfe}", disable=not progress,
               leave=False)
    for _ in bar:
        it_done += 1
        fit = _step(lr_, noise, targets, cond, opts, generator)
        scales.append(scale)
        val = validate()
        verdict = stop.update(val)
        if verdict == "best":
            best, best_steps = lr_.snapshot(), it_done
        elif verdict == "reduce":
            lr_.restore(best)
            reductions += 1
            if reductions > opts.max_reductions:
                break
            scale *= 0.5
            for group in lr_.opt.param_groups:
                group["lr"] *= 0.5
        bar.set_postfix(fit=f"{fit:.4g}", val=f"{val:.4g}", best=f"{stop.best:.4g}")
    bar.close()
    lr_.restore(best)
    if opts.refit and internal and best_steps > 0:
        # the same number of steps, at the same learning rates, on every fit noise (no restores)
        lr_ = _Learner(denoiser, base, lo, hi, opts, noise.dtype)
        base_lrs = [group["lr"] for group in lr_.opt.param_groups]
        for sc in scales[:best_steps]:
            for group, lr0 in zip(lr_.opt.param_groups, base_lrs):
                group["lr"] = lr0 * sc
            _step(lr_, *full, opts, generator)
        noise = full[0]
    with torch.no_grad():
        sig, ev, c = lr_.build()
    return Schedule(
        sig, method="learned", solver=base.solver, nfe=base.nfe, model=model_id, objective=stop.best,
        eval_sigmas=ev, coefficients=c,
        meta={
            "objective_name": "validation endpoint RMSE to the exact ODE",
            "base_method": base.method, "base_sigmas": base.sigmas.tolist(),
            "base_eval_sigmas": None if base.eval_sigmas is None else base.eval_sigmas.tolist(),
            "initial_validation": init_val, "sigma_min": lo, "sigma_max": hi,
            "history": opts.history, "l2": opts.l2, "lr": opts.lr, "lr_schedule": opts.lr_schedule,
            "train": int(noise.shape[0]), "refit": bool(opts.refit),
            "validation": int(val_noise.shape[0]),
            "iterations": it_done, "optimization_seconds": round(time.perf_counter() - t0, 3),
        },
    )
