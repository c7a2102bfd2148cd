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

Cost: the latent acceptance test adds one no-grad solve per iteration (``ball_radius=0`` skips it).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from fastgen.core.ode import reference_solve
from fastgen.core.schedules import karras
from fastgen.core.solvers import get_solver, heun
from fastgen.samplers.ays import _sigma_range
from fastgen.samplers.schedule import OffsetDenoiser, Schedule, steps_within_nfe

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


def _split_cond(cond: dict[str, Any], n: int, idx: torch.Tensor) -> dict[str, Any]:
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n else v)
            for k, v in cond.items()}


def learn_ld3(
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    *,
    solver: str = "dpmpp_2m",
    nfe: int = 6,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    targets: torch.Tensor | None = None,
    teacher_steps: int | None = None,
    train_fraction: float = 0.5,
    iterations: int = 150,
    warmup_iterations: int | None = None,
    decoupled: bool = True,
    ball_radius: float | None = None,
    distance: Distance | None = None,
    lr: float = 0.005,
    lr_offsets: float | None = None,
    lr_latent: float | None = None,
    batch_size: int | None = None,
    patience: int = 5,
    min_lr: float = 5e-5,
    max_floor_hits: int = 5,
    init: str | Schedule | torch.Tensor = "loglinear",
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    model_id: str | None = None,
    **cond: Any,
) -> Schedule:
    """Learn a schedule for ``solver`` at ``nfe`` denoiser calls (final step to 0 included).

    Args:
        denoiser: VE denoiser ``D(x, sigma, **cond)``; must be differentiable in x and sigma.
        noise: (M, ...) unit Gaussian noises (M >= 2); ``x_T = noise * sigma_max``. A fraction
            ``train_fraction`` trains, the rest validates (early stopping).
        targets: (M, ...) teacher endpoints for these noises; computed by
            :func:`teacher_endpoints` when None.
        sigma_min, sigma_max: end knots (VE); default the denoiser's range or [0.002, 80].
        decoupled: also learn the evaluation offsets (params2) after ``warmup_iterations``.
        ball_radius: soft-loss radius r on the unit-noise latent; default ``0.001 d / steps^2``;
            0 gives the hard loss.
        distance: per-sample differentiable distance ``(B, ...) x (B, ...) -> (B,)``; default RMSE.
        class_labels: optional (M,) labels passed as ``class_labels=``.
        init: "loglinear" (equal logits, the paper's default), "karras", or a schedule ending in 0
            with the solver's step count (e.g. a :mod:`fastgen.samplers.dp` result: GITS init);
            validation keeps the best state, the initial one included.

    Returns a :class:`Schedule` ending in 0 with ``steps + 1`` sigmas (``eval_sigmas`` set when
    decoupled); ``objective`` is the best validation loss; ``meta`` holds the initial validation
    loss and the optimisation time.
    """
    t_start = time.perf_counter()
    get_solver(solver)
    steps = steps_within_nfe(solver, nfe)
    if steps < 2:
        raise ValueError(
            f"nfe={nfe} is too small for solver {solver!r}: it allows {steps} step(s), and a learned "
            "schedule needs at least 2 steps (one free sigma)"
        )
    lo, hi = _sigma_range(denoiser, sigma_min, sigma_max)
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2 or noise.shape[0] < 2:
        raise ValueError("noise must be a tensor of shape (M, ...) with M >= 2 (train and validation noises)")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if isinstance(init, str) and init not in ("loglinear", "karras"):
        raise ValueError(f"init must be 'loglinear', 'karras', a Schedule or a sigma tensor, got {init!r}")
    m = noise.shape[0]
    if class_labels is not None:
        cond = {**cond, "class_labels": class_labels}
    dtype = noise.dtype
    x_t = noise * hi
    if targets is None:
        targets = teacher_endpoints(denoiser, x_t, hi, teacher_steps, **cond)
    if targets.shape != noise.shape:
        raise ValueError(
            f"targets must have the shape of noise {tuple(noise.shape)}, got {tuple(targets.shape)}"
        )
    perm = torch.randperm(m, generator=generator)
    n_train = min(max(1, int(round(m * train_fraction))), m - 1)
    tr, va = perm[:n_train], perm[n_train:]
    dim = noise[0].numel()
    radius = 0.001 * dim / steps**2 if ball_radius is None else float(ball_radius)
    if radius < 0:
        raise ValueError(f"ball_radius must be >= 0, got {radius}")
    distance = distance or rmse_distance
    solve = get_solver(solver)

    logits = init_logits(init, steps, lo, hi)
    logits.requires_grad_(True)
    offsets = torch.zeros(steps + 1, dtype=torch.float64, requires_grad=True)
    latent = noise[tr].detach().clone().requires_grad_(True)
    opt1 = torch.optim.RMSprop([logits], lr=lr, momentum=0.9)
    opt2 = torch.optim.SGD([offsets], lr=lr_offsets if lr_offsets is not None else 0.1 / steps)
    lr_latent = lr_latent if lr_latent is not None else 12.0 / steps
    warm = iterations // 3 if warmup_iterations is None else int(warmup_iterations)

    def build(lg: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        knots = logits_to_knots(lg, lo, hi)
        ev = knots * torch.exp(clamp_offsets(off, knots))
        sig = torch.cat([knots[:-1], knots.new_zeros(1)])
        return sig, ev

    def run(lg: torch.Tensor, off: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        sig, ev = build(lg, off)
        den = OffsetDenoiser(denoiser, sig, ev) if decoupled else denoiser
        with warnings.catch_warnings():  # the solvers test float(sigma) == 0 on a tensor with grad
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            return solve(den, x * hi, sig.to(dtype), **_split_cond(cond, m, idx))

    def validate() -> float:
        with torch.no_grad():
            out = run(logits, offsets, noise[va], va)
            return float(distance(out, targets[va]).mean())

    best_val = validate()
    init_val = best_val
    best_state = (logits.detach().clone(), offsets.detach().clone())
    bad, floor_hits, it_done, accepted = 0, 0, 0, 0
    bar = tqdm(range(iterations), desc=f"LD3 {solver} nfe={nfe}", disable=not progress, leave=False)
    for it in bar:
        it_done = it + 1
        bidx = torch.arange(n_train)
        if batch_size is not None and batch_size < n_train:
            bidx = torch.randperm(n_train, generator=generator)[:batch_size]
        idx = tr[bidx]
        use_off = decoupled and it >= warm
        opt1.zero_grad()
        opt2.zero_grad()
        if latent.grad is not None:
            latent.grad = None
        lat = latent[bidx] if radius > 0 else noise[idx]
        out = run(logits, offsets if decoupled else offsets.detach(), lat, idx)
        per_sample = distance(out, targets[idx])
        loss = per_sample.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([logits, offsets], 1.0)
        opt1.step()
        if use_off:
            opt2.step()
        else:
            offsets.grad = None
        if radius > 0 and latent.grad is not None:
            with torch.no_grad():  # projected step on the latent; kept per sample only if its loss fell
                before = per_sample.detach()
                delta = latent[bidx] - lr_latent * latent.grad[bidx] - noise[idx]
                norm = delta.reshape(delta.shape[0], -1).norm(dim=1).clamp(min=1e-20)
                scale = (radius / norm).clamp(max=1.0).reshape(-1, *([1] * (delta.ndim - 1)))
                cand = noise[idx] + delta * scale
                after = distance(run(logits, offsets, cand, idx), targets[idx])
                keep = (after < before).reshape(-1, *([1] * (delta.ndim - 1)))
                latent[bidx] = torch.where(keep, cand, latent[bidx])
                accepted += int(keep.sum())
                if not bool(keep.any()):
                    lr_latent *= 0.5
        val = validate()
        if val < best_val - 1e-12:
            best_val, bad = val, 0
            best_state = (logits.detach().clone(), offsets.detach().clone())
        else:
            bad += 1
            if bad >= patience:
                bad = 0
                with torch.no_grad():
                    logits.copy_(best_state[0])
                    offsets.copy_(best_state[1])
                for o in (opt1, opt2):
                    for group in o.param_groups:
                        group["lr"] = max(group["lr"] * 0.8, min_lr if o is opt1 else 1e-6)
                if opt1.param_groups[0]["lr"] <= min_lr:
                    floor_hits += 1
                    if floor_hits >= max_floor_hits:
                        break
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}", val=f"{val:.4g}", best=f"{best_val:.4g}")
    bar.close()
    with torch.no_grad():
        sig, ev = build(*best_state)
    ev = ev.clone()
    ev[-1] = 0.0
    return Schedule(
        sig,
        method="ld3",
        solver=solver,
        nfe=nfe,
        model=model_id,
        objective=best_val,
        eval_sigmas=ev if decoupled else None,
        meta={
            "objective_name": "validation distance to the teacher (default per-sample RMSE)",
            "initial_validation": init_val,
            "sigma_min": lo,
            "sigma_max": hi,
            "train": int(n_train),
            "validation": int(m - n_train),
            "ball_radius": radius,
            "latent_moves_accepted": accepted,
            "max_latent_shift": float((latent.detach() - noise[tr]).reshape(n_train, -1).norm(dim=1).max()),
            "iterations": it_done,
            "optimization_seconds": round(time.perf_counter() - t_start, 3),
        },
    )
