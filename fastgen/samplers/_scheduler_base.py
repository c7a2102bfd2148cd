"""Shared plumbing of fastgen's Diffusers schedulers: one call plan, three state spaces, a step counter.

``set_timesteps`` (:mod:`fastgen.samplers._scheduler_grids`) expands the schedule into a call plan
(:mod:`fastgen.samplers._scheduler_plan`); ``step`` is a counter walk over that plan and never
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

``order`` is 2 when the plan uses Heun (``RestartScheduler``, ``FastgenScheduler(solver="heun")``), as
``HeunDiscreteScheduler``: main step k begins at call ``2 k``, so img2img's ``timesteps[t_start * order:]``
starts at Heun's sigma and makes Heun's number of calls.

All maths runs in float32 (float64 for float64 samples, and always in flow mode, where the VE state at
sigma = 1000 would lose about 1e-4 relative precision in float32); the result is cast back to the
sample dtype. Jump noise comes from the ``generator`` given to ``step``, else the one stored with
:meth:`PlanSchedulerMixin.set_generator`, else (Flux/SD3 pipelines pass none to ``step``) a generator
seeded from the bytes of the first sample stepped, so seeded pipeline calls are reproducible.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fastgen.core import solvers as core_solvers
from fastgen.core.denoiser import DiffusersVPDenoiser, flow_output_to_x0, vp_output_to_x0
from fastgen.core.schedules import sigma_to_flow_t, ve_to_flow
from fastgen.samplers._scheduler_grids import GridMixin
from fastgen.samplers._scheduler_plan import (
    BETA_KEYS,
    COMPATIBLES,
    PREDICTION_TYPES,
    STATE_SPACES,
    CallPlan,
    SchedulerStepOutput,
    resolve_state_space,
    seed_from_sample,
    training_betas,
)
from fastgen.samplers.restart import jump

#: UniPC solvers the schedulers step, by predictor order (``unipc``: order 2, ``unipc3``: order 3).
UNIPC_ORDERS = {"unipc": 2, "unipc3": 3}

__all__ = ["PlanSchedulerMixin", "SchedulerStepOutput", "resolve_state_space", "COMPATIBLES"]


class PlanSchedulerMixin(GridMixin):
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
    def _setup(self, uses_heun: bool) -> None:
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
        self.order = 2 if uses_heun else 1
        self._vp = None
        self._beta_cfg: dict[str, Any] = {}
        if cfg.state_space != "flow":
            self.betas = training_betas({k: cfg[k] for k in BETA_KEYS})
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
            n = int(cfg.num_train_timesteps)
            self._beta_cfg = {"num_train_timesteps": n, "trained_betas": self.betas.tolist()}
            self._vp = DiffusersVPDenoiser(None, self._beta_cfg)
            self.timesteps = torch.linspace(n - 1, 0, n, dtype=torch.float32)  # as Euler before set_timesteps
        else:
            n = int(cfg.num_train_timesteps)
            self.timesteps = torch.linspace(n, 1, n, dtype=torch.float32)  # as FlowMatchEuler (shift aside)
        self.generator: torch.Generator | None = None
        self.num_inference_steps: int | None = None
        self.sigmas: torch.Tensor | None = None
        self._mu: float | None = None
        self._calls: CallPlan | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._reset_solver_state()

    def _reset_solver_state(self) -> None:
        self._heun: tuple[torch.Tensor, torch.Tensor] | None = None
        self._history: list[torch.Tensor] = []
        self._old_denoised: torch.Tensor | None = None
        self._h_last: float | None = None
        self._unipc = core_solvers.UniPCState()
        self._derived_generator: torch.Generator | None = None

    def set_generator(self, generator: torch.Generator | None) -> None:
        """Generator used for jump noise when ``step`` is called without one (Flux/SD3 pipelines)."""
        self.generator = generator

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ counter
    @property
    def step_index(self) -> int | None:
        """Index of the next call in the plan (None before the first ``step``/``scale_model_input``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at call ``begin_index`` (img2img passes ``t_start * order``).

        It must begin a main-process step and, so that ``timesteps[begin_index:]`` is the rest of the
        plan starting at main step ``begin_index / order``, no restart segment may lie before it.
        """
        self._require_plan()
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)):
            raise ValueError(f"begin_index must be an integer, got {begin_index!r}")
        n = len(self._calls)
        if not 0 <= begin_index < n:
            raise ValueError(f"begin_index must be in [0, {n - 1}] (calls in the plan), got {begin_index}")
        valid = self.valid_begin_indices()
        if begin_index not in valid:
            raise ValueError(
                f"begin_index {begin_index} falls inside a Heun step, a restart segment or after one (the "
                f"start sigma would lie below a restart interval); img2img must start at a main step before "
                f"every segment (a larger strength), valid begin indices: {valid}"
            )
        self._begin_index = int(begin_index)

    def valid_begin_indices(self) -> list[int]:
        """Call indices where main step ``k`` begins at call ``order * k`` (where sampling may start)."""
        self._require_plan()
        out, k = [], 0
        for i, start in enumerate(self._calls.starts):
            if start:
                if i == self.order * k:
                    out.append(i)
                k += 1
        return out

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
    def init_noise_sigma(self) -> torch.Tensor:
        """Initial latent std (0-d float32 tensor): VP/flow 1; VE as Euler (sigma_max, or sqrt(sigma_max^2+1))."""
        if self.config.state_space != "ve":
            return torch.tensor(1.0)
        smax = self._calls.sigmas[0] if self._calls is not None else self._train_sigma_range(1)[1]
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return torch.tensor(smax, dtype=torch.float32)
        return torch.tensor(math.sqrt(smax * smax + 1), dtype=torch.float32)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """VE mode: ``sample / sqrt(sigma^2 + 1)`` at the current call; VP and flow: the identity."""
        if self.config.state_space != "ve":
            return sample
        self._require_plan()
        if self._step_index is None:
            self._init_step_index(timestep)
        s = self._calls.sigmas[self._step_index]
        return sample / math.sqrt(s * s + 1)

    def _sigma_for(self, timesteps: Any, n: int) -> torch.Tensor:
        """VE sigma per sample: the begin/current call's, else the plan's or the training table's."""
        if self._calls is not None and (self._begin_index is not None or self._step_index is not None):
            i = self._step_index if self._step_index is not None else self._begin_index
            return torch.full((n,), self._calls.sigmas[i], dtype=torch.float64)
        ts = torch.as_tensor(timesteps).reshape(-1).double()
        sig = self._timestep_to_sigma(ts)
        if self._calls is not None:  # exact plan sigma where the timestep is a main-step entry of the plan
            plan_t = self.timesteps.cpu().double()
            for j, t in enumerate(ts.tolist()):
                hit = (plan_t - t).abs() <= 1e-6 * max(1.0, abs(t))
                if bool(hit.any()):
                    sig[j] = self._calls.sigmas[int(hit.nonzero()[0])]
        return sig.expand(n) if sig.numel() == 1 else sig

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Noise clean samples into the state space at the sigma of ``timesteps``.

        After ``set_begin_index`` (img2img) the begin call's sigma; otherwise each timestep's sigma
        (a plan entry's exact sigma, or any training timestep in ``[0, num_train_timesteps - 1]``).
        """
        s = self._sigma_for(timesteps, original_samples.shape[0]).to(original_samples.device, torch.float32)
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
        """x0 through the core adapters' conversions (VP output or flow velocity ``eps - x0``)."""
        t = sigma_to_flow_t(sigma)
        if self.config.state_space == "flow":  # state = x_fm
            return flow_output_to_x0(out, state, t)
        if self.config.prediction_type == "flow":
            return flow_output_to_x0(out, ve_to_flow(x, sigma), t)
        return vp_output_to_x0(out, x, sigma, self.config.prediction_type)

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
        if solver in UNIPC_ORDERS:  # the corrector refines the current state with this call's output
            return core_solvers.unipc_step(x, denoised, s, sn, self._unipc, UNIPC_ORDERS[solver], len(calls) - c)
        raise ValueError(f"unknown solver {solver!r}")

    def _noise_generator(self, generator: torch.Generator | None, sample: torch.Tensor) -> torch.Generator:
        """The step's generator, else :meth:`set_generator`'s, else one seeded from the first sample."""
        if generator is not None:
            return generator
        if self.generator is not None:
            return self.generator
        if self._derived_generator is None:
            g = torch.Generator(device=sample.device)
            g.manual_seed(seed_from_sample(sample))
            self._derived_generator = g
        return self._derived_generator

    def _check_timestep(self, timestep: Any) -> None:
        if isinstance(timestep, (int, np.integer)) or (
            isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()
        ):
            raise ValueError(
                "timestep must be an entry of scheduler.timesteps (a float), not an integer loop index"
            )

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
        self._check_timestep(timestep)
        self._require_plan()
        if self._step_index is None:
            self._init_step_index(timestep)
        c = self._step_index
        calls = self._calls
        if c >= len(calls):
            raise ValueError(
                f"step called {c + 1} times for a plan of {len(calls)} calls; call set_timesteps again"
            )
        if c == (self._begin_index or 0) and self._has_jumps and generator is None and self.generator is None:
            self._derived_generator = None
            self._noise_generator(None, sample)  # seed from the initial latents
        # flow mode: VE arithmetic at sigma up to FLOW_SIGMA_MAX = 1000 loses ~1e-4 in float32, use float64
        wide = sample.dtype == torch.float64 or self.config.state_space == "flow"
        cdt = torch.float64 if wide else torch.float32
        state = sample.to(cdt)
        sigma = calls.sigmas[c]
        f = self._to_ve_factor(sigma)
        x = state * f if f != 1.0 else state
        denoised = self._x0(model_output.to(cdt), x, state, sigma)
        x_next = self._advance(x, denoised, c)
        if calls.jumps[c]:
            gen = self._noise_generator(generator, sample)
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
