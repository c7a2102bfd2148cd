"""LD3: learning to discretize denoising diffusion ODEs (Tong et al., ICLR 2025), for any denoiser.

For one solver and one NFE budget, the schedule is learned by backpropagating through the solver:

- **Teacher**: accurate endpoints ``Psi*(x_T)`` from a fine solve (the adaptive reference ODE by
  default, or ``teacher_steps`` Heun steps on a Karras grid).
- **Parameterisation** (params1): ``steps`` logits -> softmax -> cumulative sum -> affine map onto
  ``[log sigma_max, log sigma_min]``: monotone knots with fixed end points; the last knot is
  replaced by 0 (the solver's final step goes to 0). **Decoupled offsets** (params2): one log-sigma
  offset per knot, clamped to +-0.5 x the smallest log gap, end points masked: the solver's
  coefficients use the knots, the denoiser is evaluated at ``knot * exp(offset)``.
- **Soft loss**: ``E min_{x'_T in B(x_T, r sigma_T)} d(Psi_xi(x'_T), Psi*(x_T))``; the latent is a
  per-sample parameter moved by projected gradient steps inside the ball of radius
  ``r = 0.001 d / steps^2`` (unit-noise units); a move is kept for a sample only if its loss fell
  (loss after the schedule and latent updates vs. the loss of this iteration's forward pass), and
  the latent step is halved after an iteration with no accepted move. ``d`` defaults to the
  per-sample RMSE in data space; any differentiable ``distance(a, b) -> (B,)`` can be passed
  (e.g. LPIPS on decoded latents).
- **Optimisation**: RMSprop (lr 0.005, momentum 0.9) on the logits, SGD (lr 0.1/steps) on the
  offsets, gradient clipping at norm 1, a first phase on the logits only, validation on a held-out
  split every iteration, patience: reload the best state and multiply the learning rates by 0.8;
  stop at ``iterations`` or after the learning rate hit its floor ``max_floor_hits`` times.

Official options: ``rounds=(2, 5)`` with ``batch_size=2`` sweeps the training split in minibatches,
two rounds on the logits then five on both (validating after every minibatch), and
``optimize_val_latents`` gives the validation split its own ball latents (a soft validation loss).
Steps: a multi-call solver gets ``nfe // calls_per_step`` steps (:func:`ld3_steps`; Heun: ``nfe // 2``).

Cost: the latent acceptance test adds one no-grad solve per iteration (``ball_radius=0`` skips it).
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

from fastgen.core.ode import reference_solve
from fastgen.core.schedules import karras
from fastgen.core.solvers import get_solver, heun
from fastgen.samplers.optim_common import Patience, resolve_sigma_range, split_cond
from fastgen.samplers.schedule import OffsetDenoiser, Schedule

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rmse_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square difference ``(B,)`` (the default LD3 distance, data space)."""
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(1).add(1e-20).sqrt()


def logits_to_knots(logits: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """``steps`` logits -> ``steps + 1`` knots from ``sigma_max`` down to ``sigma_min`` (exactly).

    Log-sigma decreases by ``softmax(logits) * (log sigma_max - log sigma_min)`` per step, so the
    knots are strictly decreasing for any finite logits; equal logits give the log-linear schedule.
    """
    frac = torch.cumsum(torch.softmax(logits, 0), 0)
    frac = torch.cat([frac.new_zeros(1), frac / frac[-1]])
    lmax, lmin = math.log(sigma_max), math.log(sigma_min)
    return torch.exp(lmax + frac * (lmin - lmax))


def clamp_offsets(offsets: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Offsets (log-sigma) clamped to +-0.5 x the smallest log gap of ``knots``; end points set to 0."""
    width = 0.5 * float((knots[:-1].log() - knots[1:].log()).min().detach())
    mask = torch.ones_like(offsets)
    mask[0] = 0
    mask[-1] = 0
    return offsets.clamp(-width, width) * mask


def init_logits(init: str | Schedule | torch.Tensor, steps: int, sigma_min: float, sigma_max: float
                ) -> torch.Tensor:
    """Logits (steps,) whose knots reproduce ``init``: "loglinear" (equal logits), "karras" (rho = 7
    knots of ``steps + 1``), or a schedule ending in 0 with ``steps + 1`` sigmas (e.g. a DP/GITS result,
    the paper's optional GITS initialisation): its positive sigmas are clipped into
    [sigma_min, sigma_max], the first set to sigma_max, and sigma_min appended as the last knot."""
    if isinstance(init, str):
        if init == "loglinear":
            return torch.zeros(steps, dtype=torch.float64)
        knots = karras(steps + 1, sigma_min, sigma_max)[:-1]
    else:
        sig = init.sigmas if isinstance(init, Schedule) else torch.as_tensor(init, dtype=torch.float64)
        sig = sig.detach().double().cpu()
        if sig.ndim != 1 or sig.shape[0] != steps + 1 or float(sig[-1]) != 0:
            raise ValueError(f"init schedule must have {steps + 1} sigmas ending in 0 (the solver's steps "
                             f"for this nfe), got {sig.tolist()}")
        pos = sig[:-1].clamp(sigma_min, sigma_max)
        pos[0] = sigma_max
        knots = torch.cat([pos, pos.new_tensor([sigma_min])])
    gaps = (knots[:-1].log() - knots[1:].log()).clamp(min=1e-6 * math.log(sigma_max / sigma_min))
    return (gaps / gaps.sum()).log()


def teacher_endpoints(denoiser: Callable[..., torch.Tensor], x_t: torch.Tensor, sigma_max: float,
                      teacher_steps: int | None = None, rtol: float = 1e-5, **cond: Any) -> torch.Tensor:
    """Accurate ODE endpoints from ``x_t`` at ``sigma_max`` to 0: adaptive dopri5 (``teacher_steps``
    None) or Heun on a Karras grid of ``teacher_steps`` steps down to ``sigma_max * 1e-4``."""
    with torch.no_grad():
        if teacher_steps is None:
            return reference_solve(denoiser, x_t, sigma_max, 0.0, rtol=rtol, atol=rtol, **cond)
        grid = karras(int(teacher_steps), max(sigma_max * 1e-4, 1e-4), sigma_max).to(x_t.dtype)
        return heun(denoiser, x_t, grid, **cond)


def ld3_steps(solver: str, nfe: int) -> int:
    """LD3's step count for ``nfe``: ``nfe // 2`` for Heun (two calls per step, as the official code
    counts it), ``nfe`` for the one-call solvers."""
    get_solver(solver)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    return nfe // 2 if solver == "heun" else nfe


def ball_radius_for(dim: int, steps: int) -> float:
    """The paper's soft-loss radius ``0.001 d / steps^2`` (unit-noise units; CIFAR-10 d = 3072)."""
    return 0.001 * dim / steps**2


@dataclass
class LD3Options:
    """Hyper-parameters of :func:`learn_ld3` (defaults: the paper's, full-batch iterations).

    - ``sigma_min``/``sigma_max``: end knots (VE); default the denoiser's range or [0.002, 80].
    - ``teacher_steps``: Heun steps of the teacher (None: adaptive reference ODE).
    - ``train_fraction``: share of the noises that trains; the rest validates (early stopping).
    - ``iterations``/``warmup_iterations``: optimiser steps, and how many of them move the logits only
      (default a third). Ignored when ``rounds=(warm, joint)`` is given: then each round sweeps the
      shuffled training split in minibatches of ``batch_size`` (the official trainer).
    - ``decoupled``: also learn the evaluation offsets (params2).
    - ``ball_radius``: soft-loss radius r on the unit-noise latent (None: :func:`ball_radius_for`;
      0: hard loss). ``optimize_val_latents``: validation noises get latents in the ball too.
    - ``distance``: per-sample differentiable ``(B, ...) x (B, ...) -> (B,)`` (default RMSE).
    - ``lr``/``lr_offsets``/``lr_latent``: RMSprop on logits, SGD on offsets (0.1/steps), latent step
      (12/steps). ``patience``, ``min_lr``, ``max_floor_hits``: the early-stopping rule.
    - ``init``: "loglinear", "karras", or a schedule ending in 0 with the solver's step count.
    """

    sigma_min: float | None = None
    sigma_max: float | None = None
    teacher_steps: int | None = None
    train_fraction: float = 0.5
    iterations: int = 150
    warmup_iterations: int | None = None
    rounds: tuple[int, int] | None = None
    decoupled: bool = True
    ball_radius: float | None = None
    optimize_val_latents: bool = False
    distance: Distance | None = None
    lr: float = 0.005
    lr_offsets: float | None = None
    lr_latent: float | None = None
    batch_size: int | None = None
    patience: int = 5
    min_lr: float = 5e-5
    max_floor_hits: int = 5
    init: str | Schedule | torch.Tensor = "loglinear"

    def check(self) -> None:
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {self.iterations!r}")
        if self.rounds is not None and (len(self.rounds) != 2 or min(self.rounds) < 0 or sum(self.rounds) < 1):
            raise ValueError(
                f"rounds must be (warmup_rounds, joint_rounds) >= 0 with a positive sum, got {self.rounds!r}"
            )
        if isinstance(self.init, str) and self.init not in ("loglinear", "karras"):
            raise ValueError(f"init must be 'loglinear', 'karras', a Schedule or a sigma tensor, got {self.init!r}")
        if self.ball_radius is not None and self.ball_radius < 0:
            raise ValueError(f"ball_radius must be >= 0, got {self.ball_radius}")


_OPTION_NAMES = {f.name for f in fields(LD3Options)}


class _Problem:
    """The fixed data of one LD3 run: solver, range, noises, teacher targets, split, radius."""

    def __init__(self, denoiser, noise, solver, nfe, opts, targets, cond, generator):
        self.denoiser, self.solver, self.nfe, self.opts = denoiser, solver, nfe, opts
        self.solve = get_solver(solver)
        self.steps = ld3_steps(solver, nfe)
        if self.steps < 2:
            raise ValueError(
                f"nfe={nfe} is too small for solver {solver!r}: it allows {self.steps} step(s), and a learned "
                "schedule needs at least 2 steps (one free sigma)"
            )
        self.lo, self.hi = resolve_sigma_range(denoiser, opts.sigma_min, opts.sigma_max)
        if not isinstance(noise, torch.Tensor) or noise.ndim < 2 or noise.shape[0] < 2:
            raise ValueError("noise must be a tensor of shape (M, ...) with M >= 2 (train and validation noises)")
        self.noise, self.cond, self.m = noise, cond, noise.shape[0]
        if targets is None:
            targets = teacher_endpoints(denoiser, noise * self.hi, self.hi, opts.teacher_steps, **cond)
        if targets.shape != noise.shape:
            raise ValueError(f"targets must have the shape of noise {tuple(noise.shape)}, got {tuple(targets.shape)}")
        self.targets = targets
        perm = torch.randperm(self.m, generator=generator)
        self.n_train = min(max(1, int(round(self.m * opts.train_fraction))), self.m - 1)
        self.tr, self.va = perm[: self.n_train], perm[self.n_train :]
        dim = noise[0].numel()
        self.radius = ball_radius_for(dim, self.steps) if opts.ball_radius is None else float(opts.ball_radius)
        self.distance = opts.distance or rmse_distance

    def build(self, logits: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(solver sigmas ending in 0, evaluation sigmas) of the parameters."""
        knots = logits_to_knots(logits, self.lo, self.hi)
        ev = knots * torch.exp(clamp_offsets(offsets, knots))
        return torch.cat([knots[:-1], knots.new_zeros(1)]), ev

    def run(self, logits, offsets, x_unit: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        sig, ev = self.build(logits, offsets)
        den = OffsetDenoiser(self.denoiser, sig, ev) if self.opts.decoupled else self.denoiser
        with warnings.catch_warnings():  # the solvers test float(sigma) == 0 on a tensor with grad
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            return self.solve(den, x_unit * self.hi, sig.to(self.noise.dtype), **split_cond(self.cond, self.m, idx))

    def loss(self, logits, offsets, x_unit, idx) -> torch.Tensor:
        return self.distance(self.run(logits, offsets, x_unit, idx), self.targets[idx])


class _Params:
    """Learned state: logits, offsets, per-sample latents, their optimisers and latent step."""

    def __init__(self, prob: _Problem):
        o, steps = prob.opts, prob.steps
        self.logits = init_logits(o.init, steps, prob.lo, prob.hi).requires_grad_(True)
        self.offsets = torch.zeros(steps + 1, dtype=torch.float64, requires_grad=True)
        self.latent = prob.noise.detach().clone().requires_grad_(True)  # all M rows; train rows move
        self.opt1 = torch.optim.RMSprop([self.logits], lr=o.lr, momentum=0.9)
        self.opt2 = torch.optim.SGD([self.offsets], lr=o.lr_offsets if o.lr_offsets is not None else 0.1 / steps)
        self.lr_latent = o.lr_latent if o.lr_latent is not None else 12.0 / steps
        self.accepted = 0

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits.detach().clone(), self.offsets.detach().clone()

    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        with torch.no_grad():
            self.logits.copy_(state[0])
            self.offsets.copy_(state[1])


def _batches(prob: _Problem, generator: torch.Generator | None) -> list[tuple[torch.Tensor, bool]]:
    """The iteration plan: (indices into the training split, move offsets) per optimiser step."""
    o, n = prob.opts, prob.n_train
    bs = o.batch_size if o.batch_size is not None and o.batch_size < n else n
    if o.rounds is not None:
        out = []
        for r in range(sum(o.rounds)):
            perm = torch.randperm(n, generator=generator)
            out += [(perm[i : i + bs], r >= o.rounds[0]) for i in range(0, n, bs)]
        return out
    warm = o.iterations // 3 if o.warmup_iterations is None else int(o.warmup_iterations)
    return [(torch.randperm(n, generator=generator)[:bs] if bs < n else torch.arange(n), it >= warm)
            for it in range(o.iterations)]


def _latent_step(prob: _Problem, p: _Params, rows: torch.Tensor, before: torch.Tensor) -> None:
    """Projected gradient step of the latents ``rows`` (indices into noise) inside the ball; a move
    is kept per sample only if its loss fell; the step is halved when no move is kept."""
    with torch.no_grad():
        base = prob.noise[rows]
        delta = p.latent[rows] - p.lr_latent * p.latent.grad[rows] - base
        shape = (-1, *([1] * (delta.ndim - 1)))
        norm = delta.reshape(delta.shape[0], -1).norm(dim=1).clamp(min=1e-20)
        cand = base + delta * (prob.radius / norm).clamp(max=1.0).reshape(shape)
        after = prob.loss(p.logits, p.offsets, cand, rows)
        keep = (after < before).reshape(shape)
        p.latent[rows] = torch.where(keep, cand, p.latent[rows])
        p.accepted += int(keep.sum())
        if not bool(keep.any()):
            p.lr_latent *= 0.5


def _train_step(prob: _Problem, p: _Params, bidx: torch.Tensor, use_off: bool) -> float:
    """One optimiser step on the training rows ``prob.tr[bidx]``; returns the minibatch loss."""
    rows = prob.tr[bidx]
    p.opt1.zero_grad()
    p.opt2.zero_grad()
    p.latent.grad = None
    x = p.latent[rows] if prob.radius > 0 else prob.noise[rows]
    per_sample = prob.loss(p.logits, p.offsets if prob.opts.decoupled else p.offsets.detach(), x, rows)
    per_sample.mean().backward()
    torch.nn.utils.clip_grad_norm_([p.logits, p.offsets], 1.0)
    p.opt1.step()
    if use_off:
        p.opt2.step()
    if prob.radius > 0 and p.latent.grad is not None:
        _latent_step(prob, p, rows, per_sample.detach())
    return float(per_sample.mean().detach())


def _validate(prob: _Problem, p: _Params) -> float:
    """Mean validation distance; with ``optimize_val_latents`` the validation latents first take
    one accepted-if-better step in their ball (a soft validation loss)."""
    va = prob.va
    if prob.opts.optimize_val_latents and prob.radius > 0:
        p.latent.grad = None
        lat = p.latent[va].detach().requires_grad_(True)
        per = prob.loss(p.logits.detach(), p.offsets.detach(), lat, va)
        (g,) = torch.autograd.grad(per.sum(), lat)
        p.latent.grad = torch.zeros_like(p.latent)
        p.latent.grad[va] = g
        _latent_step(prob, p, va, per.detach())
        p.latent.grad = None
    with torch.no_grad():
        x = p.latent[va] if prob.opts.optimize_val_latents else prob.noise[va]
        return float(prob.loss(p.logits, p.offsets, x, va).mean())


def _reduce_lr(p: _Params, min_lr: float) -> bool:
    """Multiply both learning rates by 0.8 (floors ``min_lr`` and 1e-6); True if lr1 is at its floor."""
    for o, floor in ((p.opt1, min_lr), (p.opt2, 1e-6)):
        for group in o.param_groups:
            group["lr"] = max(group["lr"] * 0.8, floor)
    return p.opt1.param_groups[0]["lr"] <= min_lr


def learn_ld3(
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    *,
    solver: str = "dpmpp_2m",
    nfe: int = 6,
    options: LD3Options | None = None,
    targets: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    model_id: str | None = None,
    **kwargs: Any,
) -> Schedule:
    """Learn a schedule for ``solver`` at ``nfe`` denoiser calls (final step to 0 included).

    Args:
        denoiser: VE denoiser ``D(x, sigma, **cond)``; must be differentiable in x and sigma.
        noise: (M, ...) unit Gaussian noises (M >= 2); ``x_T = noise * sigma_max``.
        options: :class:`LD3Options`; keyword arguments naming its fields override it (e.g.
            ``iterations=30``); other keyword arguments are conditioning passed to every call.
        targets: (M, ...) teacher endpoints for these noises (default :func:`teacher_endpoints`).
        class_labels: optional (M,) labels passed as ``class_labels=``.

    Returns a :class:`Schedule` ending in 0 with ``ld3_steps(solver, nfe) + 1`` sigmas
    (``eval_sigmas`` set when decoupled); ``objective`` is the best validation loss; ``meta`` holds
    the initial validation loss, the radius, iterations and the optimisation time.
    """
    t_start = time.perf_counter()
    opts = replace(options or LD3Options(), **{k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_NAMES})
    opts.check()
    cond = {**kwargs, "class_labels": class_labels} if class_labels is not None else kwargs
    prob = _Problem(denoiser, noise, solver, nfe, opts, targets, cond, generator)
    p = _Params(prob)
    stop = Patience(opts.patience)
    stop.update(_validate(prob, p))
    init_val, best_state = stop.best, p.snapshot()
    floor_hits, it_done = 0, 0
    plan = _batches(prob, generator)
    bar = tqdm(plan, desc=f"LD3 {solver} nfe={nfe}", disable=not progress, leave=False)
    for bidx, use_off in bar:
        it_done += 1
        loss = _train_step(prob, p, bidx, opts.decoupled and use_off)
        val = _validate(prob, p)
        verdict = stop.update(val)
        if verdict == "best":
            best_state = p.snapshot()
        elif verdict == "reduce":
            p.restore(best_state)
            if _reduce_lr(p, opts.min_lr):
                floor_hits += 1
                if floor_hits >= opts.max_floor_hits:
                    break
        bar.set_postfix(loss=f"{loss:.4g}", val=f"{val:.4g}", best=f"{stop.best:.4g}")
    bar.close()
    return _result(prob, p, best_state, stop.best, init_val, it_done, model_id, time.perf_counter() - t_start)


def _result(prob: _Problem, p: _Params, best_state, best_val: float, init_val: float, it_done: int,
            model_id: str | None, seconds: float) -> Schedule:
    with torch.no_grad():
        sig, ev = prob.build(*best_state)
    ev = ev.clone()
    ev[-1] = 0.0
    shift = (p.latent.detach() - prob.noise).reshape(prob.m, -1).norm(dim=1)
    return Schedule(
        sig, method="ld3", solver=prob.solver, nfe=prob.nfe, model=model_id, objective=best_val,
        eval_sigmas=ev if prob.opts.decoupled else None,
        meta={
            "objective_name": "validation distance to the teacher (default per-sample RMSE)",
            "initial_validation": init_val, "sigma_min": prob.lo, "sigma_max": prob.hi,
            "train": int(prob.n_train), "validation": int(prob.m - prob.n_train), "steps": prob.steps,
            "ball_radius": prob.radius, "latent_moves_accepted": p.accepted,
            "max_latent_shift": float(shift[prob.tr].max()),
            "max_val_latent_shift": float(shift[prob.va].max()),
            "rounds": list(prob.opts.rounds) if prob.opts.rounds is not None else None,
            "iterations": it_done, "optimization_seconds": round(seconds, 3),
        },
    )
