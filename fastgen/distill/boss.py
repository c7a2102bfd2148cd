"""BOSS straightening (Nguyen et al., "Bellman Optimal StepSize Straightening of flow-matching models").

Card: ``shared/methods/schedules.md`` section 4. Two stages, in fastgen's VE sigma space:

1. **Steps by dynamic programming** (:func:`fastgen.samplers.dp.dp_schedules` with ``solver="euler"``,
   ``coeff=1`` = BOSS, metric ``mse``): the ``nfe``-step Euler schedule ``s_0 > ... > s_N = 0`` that best
   follows the teacher's ODE on a Karras grid of ``grid_size`` intervals (or ``sigmas`` given explicitly).
2. **Straightening:** fine-tune a copy of the model so that *one Euler step between chosen steps lands on
   the teacher's state*. Teacher states ``X_m`` at the chosen sigmas come from the exact ODE map
   (:func:`fastgen.core.ode.reference_trajectory`, dopri5) for a fixed pool of noises. For interval
   ``m`` (``s = s_m``, ``s' = s_{m+1}``, ``r = s'/s``) the Euler step is ``x' = D + r (x - D)``, so the
   target denoiser output is ``D* = (X_{m+1} - r X_m) / (1 - r)`` and ``x'(D*) = X_{m+1}`` exactly
   (:func:`boss_target`). The loss is the rectified-flow velocity error of the step,

       L = mean_m mean_rows mean_pixels ( t' (x'(D_theta) - X_{m+1}) / (t' - t) )^2,   t = 1 / (1 + s),

   which is BOSS's ``|| v_theta(x_t, t) - (x_{t'} - x_t) / (t' - t) ||^2`` in flow coordinates
   (``x_t = t x``; Euler in t on the flow state equals Euler in sigma on the VE state).

The result samples with :class:`fastgen.models.fewstep.FewStepStudent` on the chosen sigmas (NFE = nfe).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastgen.core.ode import reference_trajectory
from fastgen.core.schedules import sigma_to_rf_t
from fastgen.core.solvers import euler_step
from fastgen.distill.finetune import (
    ConditionSampler,
    StudentOfTeacherMethod,
    load_teacher,
    save_fewstep,
    student_copy,
)
from fastgen.models.fewstep import FewStepStudent, check_grid
from fastgen.train.config import check_fields

__all__ = ["BOSSConfig", "BOSS", "boss_target", "boss_loss", "choose_steps", "teacher_states", "from_config"]


def boss_target(x: torch.Tensor, x_next: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """The denoiser output whose Euler step from ``(x, s)`` to ``s_next`` lands on ``x_next``:
    ``(x_next - r x) / (1 - r)``, ``r = s_next / s`` (``x_next`` itself when ``s_next = 0``)."""
    r = float(s_next) / float(s)
    return (x_next - r * x) / (1 - r)


def boss_loss(x_pred: torch.Tensor, x_next: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """Per-row flow-velocity error ``mean_pixels (t'(x_pred - x_next) / (t' - t))^2``, ``t = 1/(1+s)``;
    ``s``, ``s_next`` (B,) VE sigmas. Returns (B,)."""
    t, t_next = sigma_to_rf_t(s.double()), sigma_to_rf_t(s_next.double())
    scale = (t_next / (t_next - t)).reshape(-1, *([1] * (x_pred.ndim - 1)))
    err = (x_pred.double() - x_next.double()) * scale
    return (err**2).reshape(err.shape[0], -1).mean(1)


def choose_steps(teacher: Any, noise: torch.Tensor, nfe: int, grid_size: int, metric: str = "mse",
                 coeff: float = 1.0, rho: float = 7.0, sigma_min: float | None = None,
                 sigma_max: float | None = None, **cond: Any) -> Any:
    """Stage 1: the DP Euler schedule (a :class:`fastgen.samplers.schedule.Schedule`, ending in 0)."""
    from fastgen.samplers.dp import dp_schedules

    return dp_schedules(teacher, noise, [nfe], solver="euler", grid_size=grid_size, uniform_candidate=False,
                        sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, metric=metric, coeff=coeff,
                        progress=False, **cond)[nfe]


@torch.no_grad()
def teacher_states(teacher: Any, z: torch.Tensor, sigmas: list[float], cond: Mapping[str, Any],
                   rtol: float = 1e-5, chunk: int = 512) -> torch.Tensor:
    """Exact-ODE teacher states at ``sigmas`` from ``z * sigmas[0]``: ``(len(sigmas), B, ...)`` (dopri5)."""
    out = []
    s = torch.tensor(sigmas, dtype=torch.float64)
    floor = min(1e-4, sigmas[-2] / 2)
    for i in range(0, z.shape[0], chunk):
        c = {k: (v[i : i + chunk] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
        out.append(reference_trajectory(teacher, z[i : i + chunk] * sigmas[0], s, rtol=rtol, atol=rtol,
                                        sigma_floor=floor, **c).to(z.dtype))
    return torch.cat(out, dim=1)


@dataclass
class BOSSConfig:
    """BOSS options (module docstring). ``sigmas`` (a schedule ending in 0) skips the DP search."""

    nfe: int = 4
    sigmas: list[float] | None = None
    grid_size: int = 100
    dp_samples: int = 100
    metric: str = "mse"
    coeff: float = 1.0
    rho: float = 7.0
    pool_size: int = 1024
    rtol: float = 1e-5
    sample_shape: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from fastgen.samplers.dp import METRICS

        for name in ("nfe", "grid_size", "dp_samples", "pool_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"method.{name} must be an integer >= 1, got {v!r}")
        if self.nfe > self.grid_size:
            raise ValueError(f"method.nfe ({self.nfe}) must be <= method.grid_size ({self.grid_size})")
        if self.metric not in METRICS:
            raise ValueError(f"method.metric must be one of {METRICS}, got {self.metric!r}")
        if not self.coeff > 0 or not self.rtol > 0:
            raise ValueError(f"method.coeff and method.rtol must be > 0, got {self.coeff}, {self.rtol}")
        if self.sigmas is not None:
            self.sigmas = check_grid(self.sigmas, afs=False, what="method.sigmas")
            if self.sigmas[-1] != 0:
                raise ValueError(f"method.sigmas must end in 0 (BOSS samples to the data), got {self.sigmas}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BOSSConfig:
        check_fields(cls, d, "boss method option(s)")
        d = dict(d)
        if d.get("sample_shape") is not None:
            d["sample_shape"] = tuple(int(s) for s in d["sample_shape"])
        return cls(**d)


class BOSS(StudentOfTeacherMethod):
    """The BOSS straightening method (implements :class:`fastgen.train.method.Method`): network ``student``,
    optimizer ``main``, frozen ``teacher``, no EMA. The schedule (``self.sigmas``) and the teacher-state pool
    (``self.states``, ``(N + 1, pool, ...)``) are computed at construction, deterministically from the seed.

    Each step draws ``batch`` rows of the pool and trains every chosen interval of them at once.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: BOSSConfig,
                 conditions: ConditionSampler | None = None, recipe: dict[str, Any] | None = None,
                 sigma_range: tuple[float, float] | None = None) -> None:
        if config.sample_shape is None:
            raise ValueError("BOSSConfig.sample_shape must be set (from_config takes the teacher's)")
        self.config = config
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.recipe = recipe
        self.conditions = conditions
        self.class_conditional = conditions is not None and conditions.kind == "class"
        self.last_logs: dict[str, float] = {}
        g = torch.Generator().manual_seed(int(config.seed) * 7919 + 17)
        lo, hi = sigma_range if sigma_range is not None else (None, None)
        self.schedule = None
        if config.sigmas is None:
            noise = torch.randn((config.dp_samples, *config.sample_shape), generator=g)
            cond = self._cond(config.dp_samples, g, torch.device("cpu"))
            self.schedule = choose_steps(teacher, noise, config.nfe, config.grid_size, config.metric,
                                         config.coeff, config.rho, lo, hi, **cond)
            self.sigmas = [float(v) for v in self.schedule.sigmas]
        else:
            self.sigmas = list(config.sigmas)
        z = torch.randn((config.pool_size, *config.sample_shape), generator=g)
        self.pool_cond = self._cond(config.pool_size, g, torch.device("cpu"))
        self.states = teacher_states(teacher, z, self.sigmas, self.pool_cond, config.rtol)

    # ------------------------------------------------------------------ pieces (protocol: StudentOfTeacherMethod)
    def _cond(self, n: int, generator: torch.Generator, device: torch.device) -> dict[str, Any]:
        return self.conditions.draw(n, generator, device) if self.conditions is not None else {}

    def interval_loss(self, x: torch.Tensor, x_next: torch.Tensor, m: int, cond: Mapping[str, Any]
                      ) -> torch.Tensor:
        """Per-row loss (B,) of the student's Euler step over chosen interval ``m`` from teacher state ``x``."""
        s, s_next = self.sigmas[m], self.sigmas[m + 1]
        sig = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        pred = euler_step(x, self.student(x, sig, **cond), s, s_next)
        return boss_loss(pred, x_next, sig, torch.full_like(sig, s_next))

    def step(self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
             ) -> dict[str, torch.Tensor]:
        """Draw rows of the pool and return ``{"main": mean over intervals and rows}``."""
        first = next(iter(batch.values()))
        n, dev = first.shape[0], first.device
        idx = torch.randint(0, self.states.shape[1], (n,), generator=generator, device=generator.device).cpu()
        cond = {k: v[idx].to(dev) for k, v in self.pool_cond.items()}
        losses = []
        for m in range(len(self.sigmas) - 1):
            xs = self.states[m][idx].to(dev)
            xn = self.states[m + 1][idx].to(dev)
            losses.append(self.interval_loss(xs, xn, m, cond).mean())
        self.last_logs = {f"loss_step{m}": float(v.detach()) for m, v in enumerate(losses)}
        return {"main": torch.stack(losses).mean().float()}

    def generator(self, net: nn.Module | None = None) -> FewStepStudent:
        """The Euler sampler of ``net`` (default: the student) on the chosen sigmas."""
        return FewStepStudent(net if net is not None else self.student, self.sigmas, afs=False, recipe=self.recipe)

    def save_student(self, gen: FewStepStudent, path: Any, metadata: Mapping[str, Any] | None = None,
                     half: bool = False) -> Any:
        """Write the straightened model with its schedule (:func:`fastgen.distill.finetune.save_fewstep`)."""
        return save_fewstep(gen, path, self.config.sample_shape, metadata, half)[0]


def from_config(cfg: Any) -> BOSS:
    """Factory for ``method: {name: boss, teacher: SOURCE, [init], [class_conditional], [prompts],
    ...BOSSConfig fields}``."""
    kw = {k: v for k, v in cfg.method.items() if k != "name"}
    if "teacher" not in kw:
        raise ValueError("method.teacher is required (a load_model source such as 'digits-flow')")
    model, recipe = load_teacher(kw.pop("teacher"))
    init = kw.pop("init", None)
    conditions = ConditionSampler(model, kw.pop("class_conditional", None), kw.pop("prompts", None))
    kw.setdefault("sample_shape", tuple(model.shape))
    kw.setdefault("seed", int(cfg.seed))
    bcfg = BOSSConfig.from_dict(kw)
    student, srecipe = student_copy(model, recipe, init)
    return BOSS(model.denoiser, student, bcfg, conditions, srecipe, model.sigma_range)
