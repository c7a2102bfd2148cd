"""The :class:`Schedule` value: VE sigmas plus how they were made, JSON I/O, Diffusers conversions.

A schedule is a 1-D tensor of VE sigmas (``x = x0 + sigma * eps``), strictly decreasing, either
ending in 0 (``N + 1`` entries for ``N`` solver steps) or ending in a positive minimum (the
*knots* form, like the published AYS lists that end in 0.029). Whether a final step to 0 follows a
knots-form schedule is the consumer's choice, made explicit by ``terminal``:

- ``"keep"``: use the sigmas as they are (a knots schedule then stops at its positive minimum),
- ``"append"``: append a 0 (one more step; A1111 convention),
- ``"replace"``: replace the positive minimum by 0 (same number of entries; Diffusers/ComfyUI).

A schedule already ending in 0 is unchanged by every ``terminal`` choice.

JSON layout (read by ``FastgenScheduler``, which uses ``"sigmas"`` and ``"solver"``)::

    {"sigmas": [...], "solver": "dpmpp_2m", "method": "ld3", "nfe": 6, "model": "digits-edm",
     "objective": 0.012, "fastgen_version": "0.1.0", "eval_sigmas": null, "meta": {...}}

``eval_sigmas`` (LD3's decoupled evaluation points, same length as ``sigmas``) is optional; stock
schedulers ignore it, :meth:`Schedule.wrap` applies it to a denoiser. ``coefficients`` (optional,
``method: "learned"``, :mod:`fastgen.samplers.learned_solver`) is a ``steps x history`` list of lists:
the learned combination of the previous denoiser outputs at each step, replayed by
:meth:`Schedule.wrap` (:class:`CombinedDenoiser`) for a one-call ``solver`` (:data:`COMBINABLE_SOLVERS`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastgen import __version__
from fastgen.core.schedules import apply_terminal, resample, sigma_to_timestep, validate_sigmas
from fastgen.core.solvers import SOLVERS, get_solver, steps_for_nfe
from fastgen.core.solvers import nfe as solver_nfe

_KNOWN_KEYS = {
    "sigmas", "solver", "method", "nfe", "model", "objective", "fastgen_version", "eval_sigmas", "coefficients",
    "meta",
}

#: Solvers that call the denoiser once per step, at the step's knot: the ones a learned combination
#: (``coefficients``) can be replayed with.
COMBINABLE_SOLVERS = ("euler", "dpmpp_2m", "ipndm", "unipc", "unipc3")
#: The most previous outputs a combination row may weigh.
MAX_HISTORY = 4


def steps_within_nfe(solver: str, nfe: int) -> int:
    """Largest number of steps (schedule ending in 0) whose NFE for ``solver`` is <= ``nfe``:
    :func:`fastgen.core.solvers.steps_for_nfe` with ``exact=False`` (Heun: ``(nfe + 1) // 2``)."""
    return steps_for_nfe(solver, nfe, exact=False)


@dataclass
class Schedule:
    """VE sigmas with metadata.

    Attributes:
        sigmas: (N + 1,) float64, strictly decreasing, positive except a possible final 0.
        method: how it was made ("karras", "ays", "ays-published", "ld3", "dp", ...).
        solver: the solver it was made for (a key of ``fastgen.core.solvers.SOLVERS``) or None.
        nfe: the denoiser-call budget it was made for, or None.
        model: an identifier of the model/denoiser ("sd15", "digits-edm", "mixture", ...) or None.
        objective: final objective value of the optimizer (its own units), or None.
        fastgen_version: version that wrote it.
        eval_sigmas: optional (N + 1,) sigmas where the denoiser is evaluated instead of ``sigmas``
            (LD3 decoupled offsets); None when evaluation and coefficients coincide.
        coefficients: optional (N, K) float64 combination weights of a learned solver (1 <= K <= 4;
            entry [i, j] weighs ``D_{i-1-j} - D_i`` at step i and must be 0 for j >= i); requires a
            ``solver`` in :data:`COMBINABLE_SOLVERS` and a final 0. None for a plain schedule.
        meta: free-form JSON-able extras (optimisation time, sigma range, hyper-parameters).
    """

    sigmas: torch.Tensor
    method: str = "custom"
    solver: str | None = None
    nfe: int | None = None
    model: str | None = None
    objective: float | None = None
    fastgen_version: str = __version__
    eval_sigmas: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    coefficients: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.sigmas = validate_sigmas(self.sigmas, "sigmas").detach().double().cpu()
        if self.solver is not None and self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)} or None, got {self.solver!r}")
        if self.nfe is not None and (not isinstance(self.nfe, int) or self.nfe < 1):
            raise ValueError(f"nfe must be a positive integer or None, got {self.nfe!r}")
        if self.eval_sigmas is not None:
            ev = torch.as_tensor(self.eval_sigmas, dtype=torch.float64).detach().cpu()
            if ev.shape != self.sigmas.shape or not torch.isfinite(ev).all() or (ev[:-1] <= 0).any():
                raise ValueError(
                    f"eval_sigmas must be finite, positive (except the last) and have shape "
                    f"{tuple(self.sigmas.shape)}, got {ev.tolist()}"
                )
            self.eval_sigmas = ev
        if self.objective is not None:
            self.objective = float(self.objective)
        if self.coefficients is not None:
            self.coefficients = _check_coefficients(self.coefficients, self.steps, self.solver, self.ends_in_zero)

    # ------------------------------------------------------------------ basics
    @property
    def steps(self) -> int:
        """Number of intervals (len(sigmas) - 1)."""
        return int(self.sigmas.shape[0]) - 1

    @property
    def ends_in_zero(self) -> bool:
        return float(self.sigmas[-1]) == 0

    def solver_sigmas(self, terminal: str = "replace", device: Any = None, dtype: torch.dtype = torch.float64
                      ) -> torch.Tensor:
        """Sigmas to hand a fastgen solver (ending in 0 unless ``terminal="keep"``)."""
        return apply_terminal(self.sigmas, terminal).to(device=device, dtype=dtype)

    def num_evals(self, solver: str | None = None, terminal: str = "replace") -> int:
        """Denoiser calls of ``solver`` (default: this schedule's solver) on ``solver_sigmas(terminal)``."""
        name = solver or self.solver
        if name is None:
            raise ValueError("solver is required: this schedule names none")
        return solver_nfe(name, self.solver_sigmas(terminal))

    def resampled(self, n: int) -> Schedule:
        """This schedule log-linearly resampled to ``n`` steps (the AYS rule; endpoints kept)."""
        return Schedule(resample(self.sigmas, n), method=self.method, solver=self.solver, nfe=None,
                        model=self.model, objective=None, meta={**self.meta, "resampled_from": self.steps})

    def wrap(self, denoiser: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The denoiser to use with :meth:`solver_sigmas`: evaluates at ``eval_sigmas`` if present, and
        hands the solver the learned combination of outputs if ``coefficients`` are present."""
        if self.coefficients is not None:
            return CombinedDenoiser(denoiser, self.sigmas, self.eval_sigmas, self.coefficients)
        if self.eval_sigmas is None:
            return denoiser
        return OffsetDenoiser(denoiser, self.sigmas, self.eval_sigmas)

    def sample(self, denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, solver: str | None = None,
               terminal: str = "replace", **cond: Any) -> torch.Tensor:
        """Solve from ``noise * sigmas[0]`` (noise ~ N(0, I)) with this schedule; returns x at the end."""
        name = solver or self.solver
        if name is None:
            raise ValueError("solver is required: this schedule names none")
        sig = self.solver_sigmas(terminal, device=noise.device, dtype=noise.dtype)
        return get_solver(name)(self.wrap(denoiser), noise * sig[0], sig, **cond)

    # ------------------------------------------------------------------ Diffusers conversions
    def to_diffusers_sigmas(self, terminal: str = "replace") -> list[float]:
        """``sigmas=`` for Euler/Heun/DPM-style Diffusers schedulers: N + 1 VE sigmas with the terminal.

        ``EulerDiscreteScheduler.set_timesteps(sigmas=...)`` takes the list as is (its last entry is
        the terminal) and derives timesteps from ``sigmas[:-1]``.
        """
        return [float(s) for s in self.solver_sigmas(terminal)]

    def to_diffusers_timesteps(self, scheduler_config: Mapping[str, Any], terminal: str = "replace",
                               rounding: bool = True) -> list[int] | list[float]:
        """``timesteps=`` for DDPM-table schedulers (DDIM, DPMSolverMultistep, PNDM, ...): N values.

        Each step's start sigma is mapped to the training timestep by linear interpolation of the
        timestep in log-sigma over the config's table (Diffusers' ``_sigma_to_t`` rule); the final
        step to the table's end (``final_alpha_cumprod``) is implicit. ``terminal="replace"`` turns
        the published AYS knots (…, 0.152, 0.029) into 10 timesteps ending in the one for 0.152;
        ``"append"`` keeps the 0.029 knot as an 11th timestep.
        """
        from fastgen.core.denoiser import vp_sigmas_from_config
        from fastgen.core.schedules import is_flow_config

        if is_flow_config(scheduler_config):
            raise ValueError("scheduler_config is a flow-matching config; use to_flow_sigmas() instead")
        sig = self.solver_sigmas(terminal)
        starts = sig[:-1] if float(sig[-1]) == 0 else sig
        table = vp_sigmas_from_config(scheduler_config)
        lo, hi = float(table[0]), float(table[-1])
        if float(starts.max()) > hi * 1.02 or float(starts.min()) < lo / 1.02:  # 2%: published lists are rounded
            raise ValueError(
                f"schedule sigmas [{float(starts.min()):.4g}, {float(starts.max()):.4g}] lie outside the "
                f"scheduler table's range [{lo:.4g}, {hi:.4g}]"
            )
        t = sigma_to_timestep(starts, table)
        if rounding:
            out = [int(round(float(v))) for v in t]
            for i in range(1, len(out)):  # keep them strictly decreasing after rounding
                if out[i] >= out[i - 1]:
                    raise ValueError(
                        f"two sigmas map to the same integer timestep {out[i]}; "
                        "pass rounding=False or use sigmas="
                    )
            return out
        return [float(v) for v in t]

    def to_flow_sigmas(self, terminal: str = "replace") -> list[float]:
        """Flow-matching sigmas in [0, 1] (Diffusers convention, 1 = noise): N entries, no terminal.

        ``t = sigma / (1 + sigma)`` of each step's start sigma; ``FlowMatchEulerDiscreteScheduler``
        appends the terminal itself. Note that a flow scheduler with ``shift != 1`` or dynamic
        shifting transforms user sigmas again; set ``shift=1.0`` / ``use_dynamic_shifting=False`` to
        run these sigmas as they are.
        """
        sig = self.solver_sigmas(terminal)
        starts = sig[:-1] if float(sig[-1]) == 0 else sig
        return [float(s / (1 + s)) for s in starts]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "sigmas": [float(s) for s in self.sigmas],
            "solver": self.solver,
            "method": self.method,
            "nfe": self.nfe,
            "model": self.model,
            "objective": self.objective,
            "fastgen_version": self.fastgen_version,
            "eval_sigmas": None if self.eval_sigmas is None else [float(s) for s in self.eval_sigmas],
            "coefficients": None if self.coefficients is None else self.coefficients.tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """Build from a dict with at least ``"sigmas"`` (ValueError on missing/invalid fields)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a schedule must be a JSON object, got {type(data).__name__}")
        if "sigmas" not in data:
            raise ValueError("a schedule JSON needs a top-level 'sigmas' list")
        unknown = set(data) - _KNOWN_KEYS
        meta = dict(data.get("meta") or {})
        if unknown:
            meta["unknown_keys"] = {k: data[k] for k in sorted(unknown)}
        sig = data["sigmas"]
        if not isinstance(sig, (list, tuple)) or not all(isinstance(v, (int, float)) for v in sig):
            raise ValueError("'sigmas' must be a list of numbers")
        return cls(
            sigmas=torch.tensor([float(v) for v in sig], dtype=torch.float64),
            method=str(data.get("method") or "custom"),
            solver=data.get("solver"),
            nfe=data.get("nfe"),
            model=data.get("model"),
            objective=data.get("objective"),
            fastgen_version=str(data.get("fastgen_version") or __version__),
            eval_sigmas=(None if data.get("eval_sigmas") is None
                         else torch.tensor(data["eval_sigmas"], dtype=torch.float64)),  # float32 would round
            meta=meta,
            coefficients=_coefficients_from_json(data.get("coefficients")),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        """Write the JSON file (parents created); returns the path."""
        from fastgen.io.paths import atomic_write

        with atomic_write(path, "w") as f:
            f.write(self.to_json() + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        """Read a schedule JSON (FileNotFoundError if missing, ValueError if malformed)."""
        from fastgen.io.files import read_json

        data = read_json(path, "schedule file")  # names the file on every failure (binary, list, syntax)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"schedule file {str(path)!r}: {err}") from None

    def summary(self) -> str:
        """A few human-readable lines (used by ``fastgen schedule show``)."""
        lines = [
            f"method: {self.method}   solver: {self.solver}   nfe: {self.nfe}   model: {self.model}",
            f"steps: {self.steps}   ends in 0: {self.ends_in_zero}   objective: {self.objective}"
            f"   fastgen: {self.fastgen_version}",
            "sigmas: " + ", ".join(f"{float(s):.4g}" for s in self.sigmas),
        ]
        if self.eval_sigmas is not None:
            lines.append("eval_sigmas: " + ", ".join(f"{float(s):.4g}" for s in self.eval_sigmas))
        if self.coefficients is not None:
            lines.append("coefficients: " + "; ".join(", ".join(f"{float(v):.4g}" for v in row)
                                                      for row in self.coefficients))
        if self.solver is not None:
            lines.append(f"denoiser calls with {self.solver} (final step to 0): {self.num_evals()}")
        for k, v in self.meta.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)


class OffsetDenoiser(torch.nn.Module):
    """Evaluate ``denoiser`` at ``eval_sigmas[i]`` whenever a solver asks for ``sigmas[i]``.

    The solver's coefficients keep using ``sigmas`` (LD3's decoupled time steps). A sigma that is
    not in ``sigmas`` (e.g. a Heun corrector at the next knot is) is looked up by nearest log-sigma.
    Differentiable with respect to ``eval_sigmas``.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], sigmas: torch.Tensor,
                 eval_sigmas: torch.Tensor) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigmas = sigmas
        self.eval_sigmas = eval_sigmas
        self.sigma_min = getattr(denoiser, "sigma_min", None)
        self.sigma_max = getattr(denoiser, "sigma_max", None)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64).detach().reshape(-1)[0].cpu()
        knots = self.sigmas.detach().double().cpu()
        pos = knots > 0
        if float(s) <= 0 or not pos.any():
            return self.denoiser(x, sigma, **cond)
        dist = (knots[pos].log() - math.log(float(s))).abs()
        i = int(torch.nonzero(pos)[int(dist.argmin())])
        if float(dist.min()) > 1e-6:
            return self.denoiser(x, sigma, **cond)
        return self.denoiser(x, self.eval_sigmas[i].to(device=x.device, dtype=x.dtype), **cond)


def _coefficients_from_json(value: Any) -> torch.Tensor | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(r, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in r) for r in value)
            or len({len(r) for r in value}) != 1):
        raise ValueError("'coefficients' must be a non-empty list of equally long lists of numbers (steps x history)")
    return torch.tensor(value, dtype=torch.float64)


def _check_coefficients(c: Any, steps: int, solver: str | None, ends_in_zero: bool) -> torch.Tensor:
    """``coefficients`` as a validated (steps, K) float64 tensor; ValueError naming what is accepted."""
    c = torch.as_tensor(c, dtype=torch.float64).detach().cpu().clone()
    if c.ndim != 2 or c.shape[0] != steps or not 1 <= c.shape[1] <= MAX_HISTORY:
        raise ValueError(f"coefficients must have shape (steps={steps}, K) with 1 <= K <= {MAX_HISTORY}, "
                         f"got {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError("coefficients must be finite")
    i = torch.arange(steps).unsqueeze(1)
    j = torch.arange(c.shape[1]).unsqueeze(0)
    if (c[j >= i] != 0).any():
        raise ValueError("coefficients[i][j] must be 0 for j >= i (step i has only i previous outputs)")
    if solver not in COMBINABLE_SOLVERS:
        raise ValueError(f"a schedule with coefficients needs a solver among {list(COMBINABLE_SOLVERS)} (one "
                         f"denoiser call per step), got {solver!r}")
    if not ends_in_zero:
        raise ValueError("a schedule with coefficients must end in 0")
    return c


class CombinedDenoiser(torch.nn.Module):
    """A learned solver's denoiser: at knot i returns ``D_i + sum_j C[i, j] (D_{i-1-j} - D_i)``.

    ``D_k`` is ``denoiser`` evaluated at knot k (at ``eval_sigmas[k]`` if given, else at the sigma the
    solver passes). Stateful within one solve: a call at the first knot starts a new trajectory, and
    the knots must then be visited in order, once each (one-call solvers, :data:`COMBINABLE_SOLVERS`);
    anything else raises ValueError. Differentiable with respect to ``C``, ``eval_sigmas`` and x.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], sigmas: torch.Tensor,
                 eval_sigmas: torch.Tensor | None, coefficients: torch.Tensor) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigmas = sigmas
        self.eval_sigmas = eval_sigmas
        self.coefficients = coefficients
        self.sigma_min = getattr(denoiser, "sigma_min", None)
        self.sigma_max = getattr(denoiser, "sigma_max", None)
        self._log_knots = sigmas.detach().double().cpu()[:-1].log()
        self._history: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        s = float(torch.as_tensor(sigma, dtype=torch.float64).detach().reshape(-1)[0])
        dist = (self._log_knots - math.log(s)).abs() if s > 0 else None
        if dist is None or float(dist.min()) > 1e-6:
            raise ValueError(f"a learned solver's denoiser was called at sigma={s:.6g}, not one of its knots; "
                             f"replay it with its own one-call solver on its own sigmas")
        i = int(dist.argmin())
        if i == 0:
            self._history = []
        if i != len(self._history):
            raise ValueError(f"a learned solver's denoiser was called at knot {i} after {len(self._history)} "
                             "knot(s): the knots must be visited once each, in order")
        ev = sigma if self.eval_sigmas is None else self.eval_sigmas[i].to(device=x.device, dtype=x.dtype)
        d = self.denoiser(x, ev, **cond)
        out = d
        c = self.coefficients.to(device=x.device, dtype=x.dtype)
        for j in range(min(i, c.shape[1])):
            out = out + c[i, j] * (self._history[i - 1 - j] - d)
        self._history.append(d)
        return out


def endpoint_rmse(
    denoiser: Callable[..., torch.Tensor],
    schedule: Schedule | torch.Tensor,
    noise: torch.Tensor,
    reference: torch.Tensor,
    solver: str | None = None,
    terminal: str = "replace",
    **cond: Any,
) -> float:
    """RMSE (over all samples and dimensions) between the solver's endpoint from ``noise * sigmas[0]``
    and ``reference`` (the exact ODE endpoints of the same noises). ``schedule`` may be a
    :class:`Schedule` (its ``eval_sigmas`` are honoured) or a sigma tensor ending in 0."""
    if not isinstance(schedule, Schedule):
        schedule = Schedule(schedule, solver=solver)
    with torch.no_grad():
        out = schedule.sample(denoiser, noise, solver=solver, terminal=terminal, **cond)
    return float(((out.double() - reference.double()) ** 2).mean().sqrt())
