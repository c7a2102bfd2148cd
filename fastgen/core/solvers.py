"""ODE solvers for ``dx/dsigma = (x - D(x, sigma)) / sigma``, one short function each.

Every solver has the signature ``solver(denoiser, x, sigmas, *, callback=None, check_finite=True,
**cond) -> x`` where

- ``x`` is the state at ``sigmas[0]`` (VE-scaled, e.g. ``noise * sigmas[0]``),
- ``sigmas`` is a valid schedule (1-D, strictly decreasing, finite, final entry >= 0),
- ``cond`` is passed to every denoiser call (``class_labels=...``, ``encoder_hidden_states=...``),
- ``callback(info)`` is called after each step with ``{"i", "sigma", "sigma_next", "x", "denoised"}``.

They are pure functions of their inputs and differentiable with respect to ``x`` and ``sigmas``
(LD3 and AYS refinement backpropagate through them). ``nfe(name, sigmas)`` gives the exact number
of denoiser calls. A non-finite denoiser output raises :class:`NonFiniteError` naming the step and
sigma where it first appeared; it subclasses both ``FloatingPointError`` and ``ValueError``, so
``except FloatingPointError`` and ``except ValueError`` both catch it (``check_finite=False`` skips
the check, e.g. inside a tight training loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from fastgen.core.schedules import validate_sigmas

Callback = Callable[[dict[str, Any]], None] | None


class NonFiniteError(FloatingPointError, ValueError):
    """A denoiser returned NaN/Inf; ``step`` is the solver step index and ``sigma`` the sigma of that call."""

    def __init__(self, message: str, step: int, sigma: float) -> None:
        super().__init__(message)
        self.step = step
        self.sigma = sigma


def _denoise(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, i: int,
             check_finite: bool, cond: dict[str, Any]) -> torch.Tensor:
    out = denoiser(x, sigma.to(x.dtype) if sigma.is_floating_point() else sigma, **cond)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"denoiser must return a tensor of the input's shape {tuple(x.shape)}, got {shape}")
    if check_finite and not torch.isfinite(out).all():
        raise NonFiniteError(
            f"denoiser output is not finite at step {i} (sigma={float(sigma):.6g}); "
            "check the model, its dtype and the schedule's sigma range",
            step=i,
            sigma=float(sigma),
        )
    return out


def _prepare(x: torch.Tensor, sigmas: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        got = f"{x.dtype} tensor, shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of shape (B, ...), got {got}")
    sigmas = validate_sigmas(sigmas)
    if sigmas.device != x.device:
        if sigmas.requires_grad:
            raise ValueError(
                f"sigmas is on {sigmas.device} but x is on {x.device}; sigmas that require grad must be on "
                "x's device (move them before the call)"
            )
        sigmas = sigmas.to(x.device)
    return sigmas.to(x.dtype)


def _emit(callback: Callback, i: int, sigmas: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "x": x, "denoised": denoised})


# ------------------------------------------------------------------------------------------
# Single steps: the formulas, once. ``s``/``s_next`` are VE sigmas as 0-d tensors (differentiable)
# or Python floats (the schedulers' fast path); ``s_next`` may be 0 where stated.
# ------------------------------------------------------------------------------------------


def _log(v: Any) -> Any:
    return v.log() if isinstance(v, torch.Tensor) else math.log(v)


def _expm1(v: Any) -> Any:
    return torch.expm1(v) if isinstance(v, torch.Tensor) else math.expm1(v)


def _axpy(x: torch.Tensor, a: Any, y: torch.Tensor) -> torch.Tensor:
    """``x + a * y``; one fused kernel when ``a`` is a Python float (the schedulers' path)."""
    return torch.add(x, y, alpha=a) if isinstance(a, float) else x + a * y


def euler_step(x: torch.Tensor, denoised: torch.Tensor, s: Any, s_next: Any) -> torch.Tensor:
    """One Euler (= DDIM) step from ``s`` to ``s_next`` (>= 0): ``D + (s_next / s)(x - D)``."""
    return torch.lerp(denoised, x, s_next / s)


def heun_predict(x: torch.Tensor, denoised: torch.Tensor, s: Any, s_next: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Heun's predictor: ``(x_euler, d)`` with ``d = (x - D) / s`` and ``x_euler = x + (s_next - s) d``."""
    d = (x - denoised) / s
    return _axpy(x, s_next - s, d), d


def heun_correct(
    x: torch.Tensor, d: torch.Tensor, x_euler: torch.Tensor, denoised_2: torch.Tensor, s: Any, s_next: Any
) -> torch.Tensor:
    """Heun's corrector (``s_next`` > 0): ``x + (s_next - s)(d + d_2) / 2``, ``d_2 = (x_euler - D_2) / s_next``."""
    d_2 = (x_euler - denoised_2) / s_next
    return _axpy(x, (s_next - s) / 2, d + d_2)


def dpmpp_2m_step(
    x: torch.Tensor, denoised: torch.Tensor, old_denoised: torch.Tensor | None, h_last: Any, s: Any, s_next: Any
) -> tuple[torch.Tensor, Any]:
    """One DPM-Solver++(2M) step; returns ``(x_next, h)`` with ``h = log s - log s_next``.

    First order when ``old_denoised`` is None; the step to ``s_next = 0`` returns ``denoised`` (h = None).
    """
    if float(s_next) == 0:
        return denoised, None
    h = _log(s) - _log(s_next)
    # d_hat = (1 + 1/(2r)) D - 1/(2r) D_old = lerp(D_old, D, 1 + 1/(2r)), r = h_last / h
    d_hat = denoised if old_denoised is None else torch.lerp(old_denoised, denoised, 1 + h / (2 * h_last))
    return _axpy((s_next / s) * x, -_expm1(-h), d_hat), h


#: Adams-Bashforth coefficients of iPNDM by order (newest derivative first).
IPNDM_COEFFS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def ipndm_step(x: torch.Tensor, history: list[torch.Tensor], s: Any, s_next: Any) -> torch.Tensor:
    """One iPNDM step with derivatives ``history`` (newest first, 1 to 4 of them): order ``len(history)``."""
    coeffs = IPNDM_COEFFS[len(history) - 1]
    d_comb = history[0] * coeffs[0]
    for c, h in zip(coeffs[1:], history[1:]):
        d_comb = d_comb.add_(h, alpha=c)
    return _axpy(x, s_next - s, d_comb)


# ------------------------------------------------------------------------------------------
# Solvers over a whole schedule
# ------------------------------------------------------------------------------------------


def euler(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, *, callback: Callback = None,
    check_finite: bool = True, **cond: Any,
) -> torch.Tensor:
    """Euler's method in sigma (= DDIM in VE space). NFE = number of steps."""
    sigmas = _prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], i, check_finite, cond)
        x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
        _emit(callback, i, sigmas, x, denoised)
    return x


def heun(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, *, callback: Callback = None,
    check_finite: bool = True, **cond: Any,
) -> torch.Tensor:
    """Heun's 2nd-order method (EDM Algorithm 1, no churn); the step to sigma = 0 is an Euler step."""
    sigmas = _prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, s, i, check_finite, cond)
        x_euler, d = heun_predict(x, denoised, s, s_next)
        if float(s_next) == 0:
            x = x_euler
        else:
            denoised_2 = _denoise(denoiser, x_euler, s_next, i, check_finite, cond)
            x = heun_correct(x, d, x_euler, denoised_2, s, s_next)
        _emit(callback, i, sigmas, x, denoised)
    return x


def dpmpp_2m(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, *, callback: Callback = None,
    check_finite: bool = True, **cond: Any,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, midpoint form, lambda = -log sigma.

    The first step and the step to sigma = 0 are first order (Diffusers' ``lower_order_final``).
    """
    sigmas = _prepare(x, sigmas)
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], i, check_finite, cond)
        x, h = dpmpp_2m_step(x, denoised, old_denoised, h_last, sigmas[i], sigmas[i + 1])
        h_last = h if h is not None else h_last
        old_denoised = denoised
        _emit(callback, i, sigmas, x, denoised)
    return x


def ipndm(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, *, callback: Callback = None,
    check_finite: bool = True, max_order: int = 4, **cond: Any,
) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023): Adams-Bashforth on d = (x - D)/sigma with warm-up orders.

    Order ``min(i + 1, max_order)`` at step i (1 <= max_order <= 4). NFE = number of steps.
    """
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f"max_order must be 1, 2, 3 or 4, got {max_order}")
    sigmas = _prepare(x, sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, s, i, check_finite, cond)
        history = [(x - denoised) / s, *history][:max_order]
        x = ipndm_step(x, history, s, s_next)
        _emit(callback, i, sigmas, x, denoised)
    return x


def unipc(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, *, callback: Callback = None,
    check_finite: bool = True, **cond: Any,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) order 2, bh2 variant, data prediction, lambda = -log sigma (VE).

    Each step: the corrector UniC refines the state with the new denoiser output (no extra call),
    then the predictor UniP (order 2 after the first step) moves to the next sigma. The last step is
    first order (Diffusers' ``lower_order_final``), so a step to 0 returns the denoised state.
    NFE = number of steps. In VP terms (x_vp = alpha x) the same coefficients give Diffusers'
    ``UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, solver_order=2)``. It is
    :func:`unipc3` at ``order=2`` (one implementation: :func:`unipc_step`).
    """
    return unipc3(denoiser, x, sigmas, callback=callback, check_finite=check_finite, order=2, **cond)


def _unipc_system(h: torch.Tensor, rks: torch.Tensor, bh1: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UniPC's linear system for step ``h`` (lambda) and ratios ``rks`` (K,) ending in 1:
    ``(B_h, R (K, K), b (K,))`` with ``R[i] = rks**i`` and ``b`` from the phi functions (bh1: B(h) = -h)."""
    hh = -h
    h_phi_k = torch.expm1(hh) / hh - 1
    b_h = hh if bh1 else torch.expm1(hh)
    rows, b, fact = [], [], 1
    for i in range(1, rks.shape[0] + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return b_h, torch.stack(rows), torch.stack(b)


def _unipc_combo(hist: list[tuple[torch.Tensor, torch.Tensor]], h: torch.Tensor, order: int
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Ratios ``r_k = (lambda_{-k} - lambda_0) / h`` (k = 1..order-1, then 1) and ``D1_k = (m_{-k} - m_0) / r_k``."""
    m0, lam0 = hist[-1]
    rks, d1s = [], []
    for k in range(1, order):
        mk, lamk = hist[-(k + 1)]
        rk = (lamk - lam0) / h
        rks.append(rk)
        d1s.append((mk - m0) / rk)
    return torch.stack([*rks, torch.ones_like(h)]), d1s


class UniPCState:
    """What :func:`unipc_step` carries between calls: the last ``order`` ``(denoised, lambda)`` pairs
    (newest last), the state the last predictor started from (``base``), that predictor's order and
    its start sigma. A fresh instance starts a solve."""

    def __init__(self) -> None:
        self.hist: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.base: torch.Tensor | None = None
        self.base_order = 0
        self.sigma: Any = None


def unipc_step(x: torch.Tensor, denoised: torch.Tensor, s: Any, s_next: Any, state: UniPCState, order: int,
               steps_left: int, bh1: bool = False) -> torch.Tensor:
    """One UniPC call (``denoised = D(x, s)``): the corrector UniC on the step just taken (``state``),
    then the predictor UniP from ``s`` to ``s_next`` (0 returns ``denoised``). ``steps_left``: steps
    from ``s`` to the end, this one included (the last steps use lower orders, Diffusers'
    ``lower_order_final``). Updates ``state`` in place; :func:`unipc3` and the schedulers share it."""
    lam = -torch.as_tensor(s, dtype=torch.float64).log()
    if state.base is not None:  # UniC-p on the step state.sigma -> s just taken
        h = lam + torch.as_tensor(state.sigma, dtype=torch.float64).log()
        rks, d1s = _unipc_combo(state.hist, h, state.base_order)
        b_h, r_mat, b = _unipc_system(h, rks, bh1)
        rhos = torch.full_like(h, 0.5)[None] if state.base_order == 1 else torch.linalg.solve(r_mat, b)
        m0 = state.hist[-1][0]
        x = (s / state.sigma) * state.base - torch.expm1(-h).to(x.dtype) * m0
        corr = rhos[-1].to(x.dtype) * (denoised - m0)
        for rho, d1 in zip(rhos[:-1], d1s):
            corr = corr + rho.to(x.dtype) * d1
        x = x - b_h.to(x.dtype) * corr
    state.hist = [*state.hist, (denoised, lam)][-order:]
    cur = min(order, steps_left, len(state.hist))
    state.base, state.base_order, state.sigma = x, cur, s
    if float(s_next) == 0:
        return denoised
    h = -lam - torch.as_tensor(s_next, dtype=torch.float64).log()  # log s - log s_next
    x = (s_next / s) * x - torch.expm1(-h).to(x.dtype) * denoised
    if cur >= 2:
        rks, d1s = _unipc_combo(state.hist, h, cur)
        b_h, r_mat, b = _unipc_system(h, rks, bh1)
        rhos = torch.full_like(h, 0.5)[None] if cur == 2 else torch.linalg.solve(r_mat[:-1, :-1], b[:-1])
        pred = sum(rho.to(x.dtype) * d1 for rho, d1 in zip(rhos, d1s))
        x = x - b_h.to(x.dtype) * pred
    return x


def unipc3(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, *, callback: Callback = None,
    check_finite: bool = True, order: int = 3, bh1: bool = False, **cond: Any,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) of order ``order`` (default 3), bh2 variant (B(h) = e^-h - 1; ``bh1``:
    B(h) = -h, the paper's choice for unconditional pixel models), data prediction, lambda = -log sigma (VE).

    The multistep predictor UniP-p uses the last ``p`` denoiser outputs, the corrector UniC-p the new
    one (no extra call; order p + 1); warm-up and the last steps use lower orders (Diffusers'
    ``lower_order_final``), so the step to 0 returns the denoised state. NFE = number of steps. In VP
    terms it is Diffusers' ``UniPCMultistepScheduler(solver_order=order, solver_type="bh2")``;
    ``order=2`` is :func:`unipc`. (Diffusers' bh1 returns NaN on a final step to sigma 0: B(h) = -inf
    times a zero correction; here the step to 0 is the denoised state for both variants.)
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"order must be 1, 2, 3 or 4, got {order}")
    sigmas = _prepare(x, sigmas)
    n = len(sigmas) - 1
    state = UniPCState()
    for i in range(n):
        denoised = _denoise(denoiser, x, sigmas[i], i, check_finite, cond)
        x = unipc_step(x, denoised, sigmas[i], sigmas[i + 1], state, order, n - i, bh1)
        _emit(callback, i, sigmas, x, denoised)
    return x


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "ipndm": ipndm,
    "unipc": unipc,
    "unipc3": unipc3,
}

def get_solver(name: str) -> Callable[..., torch.Tensor]:
    """Look up a solver by name (``euler``, ``heun``, ``dpmpp_2m``, ``ipndm``, ``unipc``, ``unipc3``)."""
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


def nfe(name: str, sigmas: Any) -> int:
    """Exact number of denoiser calls of solver ``name`` on schedule ``sigmas``."""
    get_solver(name)
    sigmas = validate_sigmas(sigmas)
    steps = len(sigmas) - 1
    if name == "heun":
        return 2 * steps - (1 if float(sigmas[-1]) == 0 else 0)
    return steps


def steps_for_nfe(name: str, target_nfe: int, final_zero: bool = True, *, exact: bool = True) -> int:
    """Number of schedule steps for ``target_nfe`` denoiser calls of solver ``name``.

    ``heun`` uses ``2 * steps - 1`` calls when the schedule ends in 0 (its step to 0 is one Euler call),
    ``2 * steps`` otherwise; the other solvers one call per step. ``exact=True``: ValueError if no
    step count gives exactly ``target_nfe``; ``exact=False``: the largest step count within the budget
    (Heun with a final 0: ``(nfe + 1) // 2``, an even budget leaves one call unused).
    """
    get_solver(name)
    if isinstance(target_nfe, bool) or not isinstance(target_nfe, int) or target_nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {target_nfe!r}")
    if name != "heun":
        return target_nfe
    extra = 1 if final_zero else 0
    if exact and (target_nfe + extra) % 2:
        raise ValueError(
            f"heun with a final step to 0 uses an odd NFE (2*steps - 1); NFE={target_nfe} is not reachable"
        )
    return (target_nfe + extra) // 2
