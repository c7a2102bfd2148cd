"""Shared plumbing of fastgen's Diffusers schedulers: one call plan, three state spaces, a step counter.

A fastgen scheduler expands everything in ``set_timesteps`` into a *call plan*: one entry per
network evaluation (Heun's corrector and Restart's segments get their own entries), each with the
VE sigma the model is evaluated at, the sigma the returned state sits at, the solver stage and the
forward jumps to apply at the end of the call. ``step`` is a counter walk over that plan; it never
locates a step by its timestep value.

State spaces (config ``state_space``; :func:`resolve_state_space` picks the default):

- ``"ve"``: the pipeline state is the VE state ``x0 + sigma eps``; ``init_noise_sigma`` follows
  ``EulerDiscreteScheduler`` (``sigma_max`` for linspace/trailing spacing, else ``sqrt(sigma_max^2+1)``)
  and ``scale_model_input`` divides by ``sqrt(sigma^2 + 1)``. Default for VP configs other than DDPM's
  (Stable-Diffusion-style pipelines), so Euler is reproduced exactly.
- ``"vp"``: the state is ``x_VE / sqrt(1 + sigma^2)``; ``init_noise_sigma = 1`` and
  ``scale_model_input`` is the identity. Needed by ``DDPMPipeline`` (default for DDPMScheduler
  configs) and valid in every VP pipeline.
- ``"flow"``: the state is the flow state ``x_VE / (1 + sigma) = (1 - t) x0 + t eps``; timesteps are
  ``1000 t``. Default for flow-matching configs (Flux/SD3). Flow time t = 1 (VE sigma = inf) is
  capped at ``FLOW_SIGMA_MAX`` (t = 1000/1001): the initial latent is taken as the state at that sigma.

All maths runs in float32 (float64 for float64 samples, and always in flow mode, where the VE state at
sigma = 1000 would lose about 1e-4 relative precision in float32); the result is cast back to the
sample dtype. Jump noise comes only from the ``generator`` given to ``step`` or stored with
:meth:`PlanSchedulerMixin.set_generator` (Flux-style pipelines do not pass one to ``step``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput

from fastgen.core import solvers as core_solvers
from fastgen.core.denoiser import DiffusersVPDenoiser
from fastgen.core.schedules import flow_t_to_sigma, is_flow_config, validate_sigmas
from fastgen.samplers.restart import jump

STATE_SPACES = ("ve", "vp", "flow")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

#: Every Karras-family scheduler name plus the flow-matching ones: their config keys load silently.
COMPATIBLES = [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
]

_BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


@dataclass
class SchedulerStepOutput(BaseOutput):
    """``prev_sample``: the state for the next call (sample dtype); ``pred_original_sample``: x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def resolve_state_space(config: Any, state_space: str | None = None) -> str:
    """``state_space`` if given; else "flow" (flow-matching configs), "vp" (DDPMScheduler configs) or "ve"."""
    if state_space is not None:
        if state_space not in STATE_SPACES:
            raise ValueError(f"state_space must be one of {STATE_SPACES} or None, got {state_space!r}")
        return state_space
    cfg = dict(config or {})
    if is_flow_config(cfg):
        return "flow"
    ddpm_like = (
        isinstance(cfg.get("variance_type"), str) and "clip_sample" in cfg and "set_alpha_to_one" not in cfg
    )
    return "vp" if cfg.get("_class_name") == "DDPMScheduler" or ddpm_like else "ve"


@dataclass
class CallPlan:
    """One entry per network call (C entries).

    ``sigmas`` (C,) VE sigma at each call; ``after`` (C,) sigma of the state ``step`` returns;
    ``stage`` 0 (predictor / single call) or 1 (Heun corrector); ``step_from``/``step_to`` the sigmas of
    the solver step the call belongs to; ``jumps`` forward jumps ``(lo, hi)`` applied after the call;
    ``starts`` True where a main-process step begins (a valid begin index for img2img).
    """

    solver: str
    sigmas: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    stage: list[int] = field(default_factory=list)
    step_from: list[float] = field(default_factory=list)
    step_to: list[float] = field(default_factory=list)
    jumps: list[list[tuple[float, float]]] = field(default_factory=list)
    starts: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sigmas)


def build_call_plan(
    sigmas: torch.Tensor, solver: str, jumps: torch.Tensor | None = None, main: torch.Tensor | None = None
) -> CallPlan:
    """Expand a flat plan (sigmas + jump flags, see :class:`~fastgen.samplers.restart.RestartPlan`).

    ``solver`` is ``euler``, ``heun``, ``dpmpp_2m`` or ``ipndm`` (multistep solvers need no jumps).
    ``main`` (per transition) marks main-process steps; default: every non-jump transition.
    """
    s = sigmas.tolist()
    n = len(s) - 1
    jumps_l = [False] * n if jumps is None else jumps.tolist()
    main_l = [True] * n if main is None else main.tolist()
    plan = CallPlan(solver)
    i = 0
    while i < n:
        if jumps_l[i]:
            raise ValueError("a plan cannot start with a jump or have a jump before any step")
        a, b = s[i], s[i + 1]
        j = i + 1
        pending = []
        while j < n and jumps_l[j]:
            pending.append((s[j], s[j + 1]))
            j += 1
        landing = s[j]
        two = solver == "heun" and b > 0
        plan.sigmas.append(a)
        plan.stage.append(0)
        plan.step_from.append(a)
        plan.step_to.append(b)
        plan.starts.append(bool(main_l[i]))
        if two:
            plan.after.append(b)
            plan.jumps.append([])
            plan.sigmas.append(b)
            plan.stage.append(1)
            plan.step_from.append(a)
            plan.step_to.append(b)
            plan.starts.append(False)
        plan.after.append(landing)
        plan.jumps.append(pending)
        i = j
    if plan.sigmas and plan.jumps[-1]:
        raise ValueError("a plan cannot end with a jump")
    return plan


def shift_flow_t(t: np.ndarray, shift: float, mu: float | None, dynamic: bool) -> np.ndarray:
    """Diffusers' flow shift: static ``s t / (1 + (s - 1) t)`` or dynamic ``e^mu / (e^mu + 1/t - 1)``."""
    t = np.asarray(t, dtype=np.float64)
    if dynamic:
        if mu is None:
            raise ValueError("mu is required when use_dynamic_shifting=True (flow pipelines pass mu=...)")
        with np.errstate(divide="ignore"):
            return np.where(t > 0, math.exp(mu) / (math.exp(mu) + (1 / np.maximum(t, 1e-300) - 1)), 0.0)
    return shift * t / (1 + (shift - 1) * t)


class PlanSchedulerMixin:
    """Members common to :class:`RestartScheduler` and :class:`FastgenScheduler`.

    Subclasses define ``__init__`` (with ``@register_to_config``) calling :meth:`_setup`, and
    ``_make_plan(main_sigmas, custom)`` returning ``(sigmas, jumps, main, solver)`` for the flat plan.
    """

    order = 1
    _compatibles = COMPATIBLES

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """Diffusers' ``from_config``; ``state_space`` defaults by the source config (see module docs)."""
        cfg = dict(config or {})
        if kwargs.get("state_space") is None and cfg.get("state_space") is None:
            kwargs["state_space"] = resolve_state_space(cfg)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        if self.config.state_space is None:
            self.register_to_config(state_space=resolve_state_space(None))
        cfg = self.config
        if cfg.state_space not in STATE_SPACES:
            raise ValueError(f"state_space must be one of {STATE_SPACES}, got {cfg.state_space!r}")
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {cfg.prediction_type!r}"
            )
        if cfg.rescale_betas_zero_snr:
            raise ValueError("rescale_betas_zero_snr=True (infinite sigma_max) is not supported")
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(
                f"final_sigmas_type must be 'zero' or 'sigma_min', got {cfg.final_sigmas_type!r}"
            )
        self._vp = None
        if cfg.state_space != "flow":
            beta_cfg = {k: cfg[k] for k in _BETA_KEYS}
            self._vp = DiffusersVPDenoiser(None, beta_cfg)
        self.generator: torch.Generator | None = None
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self._calls: CallPlan | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._reset_solver_state()

    def _reset_solver_state(self) -> None:
        self._heun: tuple[torch.Tensor, torch.Tensor] | None = None
        self._history: list[torch.Tensor] = []
        self._old_denoised: torch.Tensor | None = None
        self._h_last: float | None = None

    def set_generator(self, generator: torch.Generator | None) -> None:
        """Generator used for jump noise when ``step`` is called without one (Flux/SD3 pipelines)."""
        self.generator = generator

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ sigma grids
    def _train_sigma_range(self, n: int) -> tuple[float, float]:
        """(sigma_min, sigma_max) that Diffusers' Euler (VP) / FlowMatchEuler (flow) default grid spans."""
        grid = self._default_grid(n)
        lo, hi = float(grid[-2]) if n > 1 else float(grid[0]) / 10, float(grid[0])
        if self.config.sigma_min is not None:
            lo = float(self.config.sigma_min)
        if self.config.sigma_max is not None:
            hi = float(self.config.sigma_max)
        return lo, hi

    def _default_grid(self, n: int, mu: float | None = None) -> torch.Tensor:
        """The VE grid of Diffusers' Euler (VP) or Flux's shifted ``linspace(1, 1/n, n)`` (flow), n steps."""
        if self.config.state_space == "flow":
            mu = mu if mu is not None else self._mu
            return self._flow_sigmas(np.linspace(1.0, 1.0 / n, n), mu, shift=True)
        from diffusers import EulerDiscreteScheduler

        keys = _BETA_KEYS + ("timestep_spacing", "steps_offset", "final_sigmas_type")
        euler = EulerDiscreteScheduler(**{k: self.config[k] for k in keys})
        euler.set_timesteps(n)
        return euler.sigmas.double()

    def _flow_sigmas(self, t: Any, mu: float | None, shift: bool | None = None) -> torch.Tensor:
        """Flow times (N entries, or with a final 0) -> shifted (if configured) -> VE sigmas ending in 0."""
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        if t.size < 1 or not np.isfinite(t).all() or (t < 0).any() or (t > 1).any():
            raise ValueError(f"flow sigmas must be finite flow times in [0, 1], got {t.tolist()}")
        if t[-1] != 0:
            t = np.concatenate([t, [0.0]])
        cfg = self.config
        if cfg.shift_custom_sigmas if shift is None else shift:
            t = shift_flow_t(t, cfg.shift, mu, cfg.use_dynamic_shifting)
        return flow_t_to_sigma(torch.from_numpy(t))

    def _final_sigma(self) -> float:
        if self.config.final_sigmas_type == "sigma_min" and self._vp is not None:
            return float(self._vp.sigma_min)
        return 0.0

    def _main_sigmas(
        self, num_inference_steps: int | None, timesteps: Any, sigmas: Any, mu: float | None
    ) -> tuple[torch.Tensor | int, bool]:
        """Normalise the three ways of asking for a schedule; returns (VE grid or N, custom?)."""
        given = [v is not None for v in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("give exactly one of num_inference_steps, timesteps or sigmas")
        self._mu = mu
        flow = self.config.state_space == "flow"
        if num_inference_steps is not None:
            n = num_inference_steps
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            return int(num_inference_steps), False
        if sigmas is not None:
            sig = sigmas.detach().cpu() if isinstance(sigmas, torch.Tensor) else sigmas
            sig = np.asarray(sig, dtype=np.float64)
            if flow:
                validate_sigmas(torch.from_numpy(sig.copy()), "sigmas")
                return self._flow_sigmas(sig, mu), True
            return validate_sigmas(torch.from_numpy(sig.copy()), "sigmas"), True
        ts = np.asarray(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                        dtype=np.float64)
        validate_sigmas(torch.from_numpy(ts.copy()), "timesteps")
        if flow:
            return self._flow_sigmas(ts / 1000.0, mu), True
        table = self._vp.table_sigmas.numpy()
        if ts[0] > len(table) - 1:
            raise ValueError(f"timesteps must lie in [0, {len(table) - 1}], got {ts[0]}")
        s = np.interp(ts, np.arange(len(table)), table)
        return torch.from_numpy(np.concatenate([s, [self._final_sigma()]])), True

    # ------------------------------------------------------------------ set_timesteps
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
        mu: float | None = None,
        **kwargs: Any,
    ) -> None:
        """Build the call plan. Exactly one of ``num_inference_steps`` (>= 1), ``timesteps`` or ``sigmas``.

        - ``sigmas``: VP/VE modes: VE sigmas, strictly decreasing, terminal included (as Euler); flow
          mode: flow times in [0, 1] (N entries, a 0 is appended; shifted like FlowMatchEuler when
          ``shift_custom_sigmas``, with ``mu`` under dynamic shifting).
        - ``timesteps``: VP: training timesteps (decreasing, sigma interpolated from the table, terminal
          appended); flow: ``1000 t``.
        - ``num_inference_steps``: the class's own schedule (see its docstring).

        Resets the step counter, the begin index and all solver state.
        """
        grid, custom = self._main_sigmas(num_inference_steps, timesteps, sigmas, mu)
        flat, jumps, main, solver = self._make_plan(grid, custom)
        calls = build_call_plan(flat, solver, jumps, main)
        self._flat = (flat, jumps, main)
        self._calls = calls
        self._final = float(flat[-1])
        self.num_inference_steps = len(calls)
        call_sigmas = torch.tensor(calls.sigmas, dtype=torch.float64)
        self.timesteps = self._sigma_to_timestep(call_sigmas).to(device=device, dtype=torch.float32)
        self.sigmas = torch.cat([call_sigmas, call_sigmas.new_tensor([self._final])]).to(torch.float32)
        self._step_index = None
        self._begin_index = None
        self._reset_solver_state()

    @property
    def plan_sigmas(self) -> torch.Tensor:
        """The flat VE-sigma plan of the last ``set_timesteps`` (float64, solver steps and jumps)."""
        self._require_plan()
        return self._flat[0].clone()

    def _sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.config.state_space == "flow":
            return sigma / (1 + sigma) * 1000.0
        return self._vp.sigma_to_t(sigma)

    # ------------------------------------------------------------------ counter
    @property
    def step_index(self) -> int | None:
        """Index of the next call in the plan (None before the first ``step``/``scale_model_input``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at call ``begin_index``; it must begin a main-process step (img2img ``strength`` slicing)."""
        self._require_plan()
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)):
            raise ValueError(f"begin_index must be an integer, got {begin_index!r}")
        n = len(self._calls)
        if not 0 <= begin_index < n:
            raise ValueError(f"begin_index must be in [0, {n - 1}] (calls in the plan), got {begin_index}")
        if not self._calls.starts[begin_index]:
            raise ValueError(
                f"begin_index {begin_index} falls inside a Heun step or a restart segment; img2img-style "
                f"slicing must start at a main step, valid begin indices: {self.valid_begin_indices()}"
            )
        self._begin_index = int(begin_index)

    def valid_begin_indices(self) -> list[int]:
        """Call indices where a main-process step begins (where sampling may start)."""
        self._require_plan()
        return [i for i, s in enumerate(self._calls.starts) if s]

    def index_for_timestep(self, timestep: Any) -> int:
        """The unique main-step call whose timestep equals ``timestep`` (ValueError if none)."""
        self._require_plan()
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        ts = self.timesteps.cpu()
        for i in self.valid_begin_indices():
            if abs(float(ts[i]) - t) <= 1e-6 * max(1.0, abs(t)):
                return i
        raise ValueError(f"timestep {t} does not begin a main step of the current plan; call set_begin_index")

    def _init_step_index(self, timestep: Any) -> None:
        begin = self._begin_index
        self._step_index = begin if begin is not None else self.index_for_timestep(timestep)

    def _require_plan(self) -> None:
        if self._calls is None:
            raise ValueError("call set_timesteps(...) before using the scheduler")

    # ------------------------------------------------------------------ state conversions
    def _to_ve_factor(self, sigma: float) -> float:
        space = self.config.state_space
        if space == "vp":
            return math.sqrt(1 + sigma * sigma)
        if space == "flow":
            return 1 + sigma
        return 1.0

    @property
    def init_noise_sigma(self) -> float:
        """Initial latent std: VP/flow 1; VE as Euler (sigma_max, or sqrt(sigma_max^2+1) if leading)."""
        if self.config.state_space != "ve":
            return 1.0
        smax = self._calls.sigmas[0] if self._calls is not None else self._train_sigma_range(1)[1]
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return smax
        return math.sqrt(smax * smax + 1)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """VE mode: ``sample / sqrt(sigma^2 + 1)`` at the current call; VP and flow: the identity."""
        if self.config.state_space != "ve":
            return sample
        self._require_plan()
        if self._step_index is None:
            self._init_step_index(timestep)
        s = self._calls.sigmas[self._step_index]
        return sample / math.sqrt(s * s + 1)

    def _sigma_for(self, timesteps: Any, n: int) -> list[float]:
        self._require_plan()
        if self._begin_index is None and self._step_index is None:
            is_tensor = isinstance(timesteps, torch.Tensor)
            ts = timesteps.reshape(-1) if is_tensor else torch.as_tensor([timesteps])
            idx = [self.index_for_timestep(t) for t in ts]
            if len(idx) == 1:
                idx = idx * n
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * n
        return [self._calls.sigmas[i] for i in idx]

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Noise clean samples to the state space at the sigma of ``timesteps`` (or of the begin index)."""
        sig = self._sigma_for(timesteps, original_samples.shape[0])
        s = torch.tensor(sig, dtype=torch.float32, device=original_samples.device)
        s = s.reshape(-1, *([1] * (original_samples.ndim - 1)))
        x = original_samples.float() + s * noise.float()
        space = self.config.state_space
        if space == "vp":
            x = x / (1 + s * s).sqrt()
        elif space == "flow":
            x = x / (1 + s)
        return x.to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """VP v-target ``sqrt(abar_t) noise - sqrt(1 - abar_t) sample`` at training timesteps (for training code)."""
        if self._vp is None:
            raise ValueError("get_velocity is defined for VP configs; flow models predict eps - x0 directly")
        table = self._vp.table_sigmas.to(sample.device)
        idx = torch.as_tensor(timesteps, device=sample.device).long().reshape(-1)
        abar = (1 / (1 + table[idx] ** 2)).reshape(-1, *([1] * (sample.ndim - 1)))
        return (abar.sqrt() * noise.double() - (1 - abar).sqrt() * sample.double()).to(sample.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor) -> torch.Tensor:
        """Flow pipelines' name for :meth:`add_noise` (``(1 - t) x0 + t eps`` in flow mode)."""
        return self.add_noise(sample, noise, timestep)

    # ------------------------------------------------------------------ step
    def _x0(self, out: torch.Tensor, x: torch.Tensor, state: torch.Tensor, sigma: float) -> torch.Tensor:
        if out.shape[1] == 2 * x.shape[1] and out.ndim == 4:  # learned variance: keep the mean
            out = out[:, : x.shape[1]]
        if self.config.state_space == "flow":  # state = x_fm, velocity out = eps - x0
            return torch.add(state, out, alpha=-(sigma / (1 + sigma)))
        if self.config.prediction_type == "flow":
            return torch.add(x / (1 + sigma), out, alpha=-(sigma / (1 + sigma)))
        pt = self.config.prediction_type
        if pt == "epsilon":
            return torch.add(x, out, alpha=-sigma)
        if pt == "v_prediction":
            scale = 1 / math.sqrt(1 + sigma * sigma)
            return scale * (x * scale) - (sigma * scale) * out
        return out

    def _advance(self, x: torch.Tensor, denoised: torch.Tensor, c: int) -> torch.Tensor:
        """One solver stage in VE sigma, through the step functions of ``fastgen.core.solvers``."""
        calls = self._calls
        s, sn = calls.step_from[c], calls.step_to[c]
        solver = calls.solver
        if solver == "euler":
            return core_solvers.euler_step(x, denoised, s, sn)
        if solver == "heun":
            if calls.stage[c] == 0:
                x_euler, d = core_solvers.heun_predict(x, denoised, s, sn)
                if sn > 0:
                    self._heun = (x, d)
                return x_euler
            x0, d = self._heun
            self._heun = None
            return core_solvers.heun_correct(x0, d, x, denoised, s, sn)
        if solver == "dpmpp_2m":
            old, self._old_denoised = self._old_denoised, denoised
            x_next, h = core_solvers.dpmpp_2m_step(x, denoised, old, self._h_last, s, sn)
            if h is not None:
                self._h_last = h
            return x_next
        if solver == "ipndm":
            self._history = [(x - denoised) / s, *self._history][:4]
            return core_solvers.ipndm_step(x, self._history, s, sn)
        raise ValueError(f"unknown solver {solver!r}")

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerStepOutput | tuple[torch.Tensor, torch.Tensor]:
        """Advance one network call of the plan (jumps included) and return the next state.

        ``timestep`` must be a float entry of ``self.timesteps`` (integer loop indices are rejected);
        it is only used to find the first index when ``set_begin_index`` was not called.
        Returns ``(prev_sample, pred_original_sample)`` (a :class:`SchedulerStepOutput` by default).
        """
        if isinstance(timestep, (int, np.integer)) or (
            isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()
        ):
            raise ValueError(
                "timestep must be an entry of scheduler.timesteps (a float), not an integer loop index"
            )
        self._require_plan()
        if self._step_index is None:
            self._init_step_index(timestep)
        c = self._step_index
        calls = self._calls
        if c >= len(calls):
            raise ValueError(
                f"step called {c + 1} times for a plan of {len(calls)} calls; call set_timesteps again"
            )
        # flow mode: VE arithmetic at sigma up to FLOW_SIGMA_MAX = 1000 loses ~1e-4 in float32, use float64
        wide = sample.dtype == torch.float64 or self.config.state_space == "flow"
        cdt = torch.float64 if wide else torch.float32
        state = sample.to(cdt)
        sigma = calls.sigmas[c]
        f = self._to_ve_factor(sigma)
        x = state * f if f != 1.0 else state
        denoised = self._x0(model_output.to(cdt), x, state, sigma)
        x_next = self._advance(x, denoised, c)
        gen = generator if generator is not None else self.generator
        s_noise = float(getattr(self.config, "s_noise", 1.0))
        for lo, hi in calls.jumps[c]:
            x_next = jump(x_next, lo, hi, s_noise, gen)
        f_next = self._to_ve_factor(calls.after[c])
        prev = x_next.div_(f_next) if f_next != 1.0 else x_next  # x_next is a fresh tensor when f_next != 1
        self._step_index = c + 1
        prev = prev.to(sample.dtype)
        denoised = denoised.to(sample.dtype)
        if not return_dict:
            return prev, denoised
        return SchedulerStepOutput(prev_sample=prev, pred_original_sample=denoised)

