"""Rectified-flow couplings and straightness, for any EDM-contract denoiser (``../shared/methods/reflow.md``).

Time axis: the rectified-flow ``t`` of :mod:`fastgen.core.schedules` (``t = 0`` noise ``z0``, ``t = 1`` data,
``x_t = (1 - t) z0 + t z1``, ``sigma = (1 - t)/t``, VE state ``x = x_t / t``). Any denoiser ``D(x, sigma)``
has the rectified-flow velocity ``v(x_t, t) = (D(x_t / t, sigma) - x_t) / (1 - t)`` (:func:`rf_velocity`;
for a flow model this is its own net's output).

- **Coupling** (:func:`generate_pairs`): ``z0 ~ N(0, I)`` from a seed, the VE start ``x = sigma_max z0`` (the
  rectified-flow state ``(1 - t_eps) z0`` at ``t_eps = 1/(1 + sigma_max)``; ``sigma_max = 999`` is the RF
  code's ``eps = 1e-3``), and ``z1 = ODE(x)``: the probability-flow ODE solved to sigma = 0 by a fastgen solver
  (:func:`fastgen.core.solvers.get_solver`) on a schedule, or by the adaptive reference (``"dopri5"``,
  :func:`fastgen.core.ode.reference_solve`). No gradients, the denoiser in eval mode.
- **Straightness** (:func:`straightness`): ``S = int_0^1 E||(Z_1 - Z_0) - dZ_t/dt||^2 dt`` along the model's
  own Euler trajectories on a uniform ``t`` grid (the squared norm is summed over dimensions, as in the
  paper); ``S = 0`` iff every path is straight at constant speed, when one Euler step is exact. Also
  reported normalised by ``E||Z_1 - Z_0||^2``.

Euler in VE sigma equals Euler in rectified-flow ``t`` step for step (``x_t' = x_t + (t' - t) v``), so the
uniform-``t`` schedule :func:`rf_uniform_sigmas` with :func:`fastgen.core.solvers.euler` *is* the
rectified-flow Euler sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastgen.core.denoiser import rf_velocity
from fastgen.core.ode import reference_solve
from fastgen.core.schedules import karras, rf_t_to_sigma, sigma_to_rf_t
from fastgen.core.solvers import euler, get_solver

__all__ = [
    "PAIR_SCHEDULES", "RF_SIGMA_MAX", "rf_uniform_sigmas", "rf_velocity", "pair_sigmas", "generate_pairs",
    "straightness",
]

#: VE sigma of the rectified-flow start ``t = eps = 1e-3`` (the RF code's epsilon): ``(1 - eps)/eps``.
RF_SIGMA_MAX = 999.0
#: Schedules for the coupling ODE: ``rf_uniform`` (uniform in rectified-flow t) or ``karras`` (rho = 7).
PAIR_SCHEDULES = ("rf_uniform", "karras")


def rf_uniform_sigmas(steps: int, sigma_max: float = RF_SIGMA_MAX) -> torch.Tensor:
    """``steps + 1`` VE sigmas (float64, ending in 0) uniform in rectified-flow time from ``t(sigma_max)`` to 1."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    t0 = float(sigma_to_rf_t(torch.tensor(float(sigma_max), dtype=torch.float64)))
    t = torch.linspace(t0, 1.0, steps + 1, dtype=torch.float64)
    s = rf_t_to_sigma(t)
    s[0], s[-1] = float(sigma_max), 0.0
    return s


def pair_sigmas(schedule: str, steps: int, sigma_max: float, sigma_min: float = 0.002) -> torch.Tensor:
    """The coupling ODE's schedule (:data:`PAIR_SCHEDULES`) from ``sigma_max`` to 0."""
    if schedule == "rf_uniform":
        return rf_uniform_sigmas(steps, sigma_max)
    if schedule == "karras":
        return karras(steps, sigma_min, sigma_max, rho=7.0)
    raise ValueError(f"pair_schedule must be one of {PAIR_SCHEDULES}, got {schedule!r}")


def _labels(n: int, num_classes: int | None) -> torch.Tensor | None:
    return None if not num_classes else torch.arange(n) % int(num_classes)


def generate_pairs(
    denoiser: torch.nn.Module | Callable[..., torch.Tensor],
    num: int,
    shape: tuple[int, ...],
    *,
    solver: str = "heun",
    steps: int = 32,
    schedule: str = "rf_uniform",
    sigma_max: float = RF_SIGMA_MAX,
    sigma_min: float = 0.002,
    num_classes: int | None = None,
    condition: Callable[[torch.Tensor], dict[str, Any]] | None = None,
    seed: int = 0,
    batch_size: int = 2048,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``{"z0": (num, *shape), "z1": (num, *shape)[, "label": (num,) int64]}`` on the CPU in ``dtype``.

    ``z0 ~ N(0, I)`` (drawn in one stream from ``seed``, so a pair does not depend on ``batch_size``),
    ``z1`` = the ODE endpoint from ``sigma_max * z0`` (``solver`` a fastgen solver name or ``"dopri5"``).
    Class-conditional denoisers (``num_classes``) get balanced labels ``i % num_classes``; the denoiser
    receives ``class_labels=labels`` or, with ``condition``, the keywords ``condition(labels)`` (e.g. the
    embeddings of prompt ``i % num_classes``: the InstaFlow coupling). No gradients; a module is put in
    eval mode for the solve and restored afterwards.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num_pairs must be an int >= 1, got {num!r}")
    if not sigma_max > 0:
        raise ValueError(f"pair_sigma_max must be > 0, got {sigma_max}")
    if condition is not None and not num_classes:
        raise ValueError("condition needs num_classes (the number of conditions the labels index)")
    if solver != "dopri5":
        solve = get_solver(solver)  # ValueError naming the accepted solvers
        sigmas = pair_sigmas(schedule, steps, sigma_max, sigma_min)
    z0 = torch.randn(num, *shape, generator=torch.Generator().manual_seed(int(seed)), dtype=dtype)
    labels = _labels(num, num_classes)
    was_training = getattr(denoiser, "training", None)
    if was_training:
        denoiser.eval()
    out = []
    try:
        from tqdm.auto import tqdm

        with torch.no_grad():
            for a in tqdm(range(0, num, batch_size), disable=not progress, desc="reflow pairs"):
                x = (z0[a : a + batch_size] * sigma_max).to(device)
                rows = None if labels is None else labels[a : a + batch_size].to(device)
                cond = {} if rows is None else (condition(rows) if condition else {"class_labels": rows})
                if solver == "dopri5":
                    z1 = reference_solve(denoiser, x, sigma_max, 0.0, **cond)
                else:
                    z1 = solve(denoiser, x, sigmas.to(device), **cond)
                out.append(z1.to(dtype).cpu())
    finally:
        if was_training:
            denoiser.train()
    pairs = {"z0": z0, "z1": torch.cat(out)}
    if labels is not None:
        pairs["label"] = labels.long()
    return pairs


def straightness(
    denoiser: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    steps: int = 100,
    sigma_max: float = RF_SIGMA_MAX,
    **cond: Any,
) -> dict[str, Any]:
    """Straightness of the denoiser's rectified-flow paths from the noises ``z0`` (B, ...).

    Euler on :func:`rf_uniform_sigmas` (``steps`` steps); at each step the velocity
    ``v_i = (D_i - x_{t_i}) / (1 - t_i)`` is compared with the path's chord speed ``(Z_1 - Z_0) / (1 - t_eps)``
    (``Z_0`` the state at ``t_eps``, ``Z_1`` the endpoint; the paper's ``Z_1 - Z_0`` over [0, 1]).
    Returns ``{"S": mean_i E_b ||chord speed - v_i||^2`` (summed over dimensions), ``"S_normalized": S /
    E||chord speed||^2``, ``"z1"``: the Euler endpoints}``.
    """
    sigmas = rf_uniform_sigmas(steps, sigma_max).to(z0.device)
    t = sigma_to_rf_t(sigmas)
    x = z0 * sigma_max
    prev = {"x": x}
    vel: list[torch.Tensor] = []

    def record(info: dict[str, Any]) -> None:
        i = info["i"]
        ti = t[i].to(x.dtype)
        xt = ti * prev["x"]
        vel.append(((info["denoised"] - xt) / (1 - ti)).flatten(1))
        prev["x"] = info["x"]

    with torch.no_grad():
        z1 = euler(denoiser, x, sigmas, callback=record, **cond)
    zstart = (t[0].to(x.dtype) * x).flatten(1)
    chord = (z1.flatten(1) - zstart) / (1 - t[0].to(x.dtype))  # the chord's constant speed over [t_eps, 1]
    s = torch.stack([((chord - v) ** 2).sum(1).mean() for v in vel]).mean()
    return {"S": float(s), "S_normalized": float(s / (chord**2).sum(1).mean()), "z1": z1}
