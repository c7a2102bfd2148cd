"""``RestartScheduler``: Restart sampling as a drop-in Diffusers scheduler (VP and flow-matching).

    pipe.scheduler = RestartScheduler.from_config(pipe.scheduler.config)

``set_timesteps`` expands the main Heun grid and the restart segments into one timestep entry per
network call (Heun's corrector repeats the next timestep, segments are inserted after the main
step landing on their snapped ``t_min``); the forward jump is added at the end of that call's
``step`` with the caller's generator, so ``prev_sample`` already sits at ``t_max``. The plan is
built by :func:`fastgen.samplers.restart.build_plan`, the same function :func:`restart_sample`
uses, so pipeline and function agree for the same noise.

Configuration (besides the standard Diffusers keys, see :mod:`fastgen.samplers._scheduler_base`):

- ``restart_segments``: ``[[n_steps, k, t_min, t_max], ...]`` in VE sigma; overrides the preset.
- ``restart_preset``: ``"auto"`` (AUTOMATIC1111 rule: ``num_inference_steps`` is the total number of
  solver steps, main grid Karras over ``steps - restart_steps * k`` points, one segment on [0.1, 2]),
  ``"none"`` (plain Heun), or a name from :data:`fastgen.samplers.restart.PRESETS` (its segments on a
  Karras grid of ``num_inference_steps`` points over the model's range).
- ``main_schedule``: ``"karras"`` (default) or ``"default"`` (Diffusers' Euler / FlowMatchEuler grid,
  the grid of ``HeunDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler``).
- ``s_noise``, ``restart_churn`` (in-segment EDM churn gamma) on ``[churn_tmin, churn_tmax]``, ``rho``.

``order = 2`` (as ``HeunDiscreteScheduler``): with no segment before it, main step k begins at call
``2 k``, so img2img ``strength`` starts where Heun on the same main grid starts. The A1111 rule makes
``2 N - 1`` calls for ``N`` steps, Heun's count.

With ``num_inference_steps`` the main grid is Karras (``rho``) over the range Diffusers' Euler
(VP) or the shifted Flux/FlowMatch default grid (flow) spans; with ``sigmas=``/``timesteps=`` the
given grid is the main grid verbatim and the segments are inserted into it.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fastgen.samplers._scheduler_base import PlanSchedulerMixin
from fastgen.samplers.restart import as_segments, auto_segments, build_plan, get_preset

MAIN_SCHEDULES = ("karras", "default")


class RestartScheduler(PlanSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Restart sampling (Xu et al. 2023) for Diffusers pipelines; see the module docstring."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        state_space: str | None = None,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_custom_sigmas: bool = True,
        use_flow_sigmas: bool = False,
        restart_preset: str = "auto",
        restart_segments: list[list[float]] | None = None,
        s_noise: float = 1.0,
        restart_churn: float = 0.0,
        churn_tmin: float = 0.01,
        churn_tmax: float = 1.0,
        rho: float = 7.0,
        main_schedule: str = "karras",
    ) -> None:
        if restart_segments is not None:
            as_segments([(int(s[0]), int(s[1]), s[2], s[3]) for s in restart_segments])
        if restart_preset not in ("auto", "none"):
            get_preset(restart_preset)
        if s_noise < 0:
            raise ValueError(f"s_noise must be >= 0, got {s_noise}")
        if main_schedule not in MAIN_SCHEDULES:
            raise ValueError(f"main_schedule must be one of {MAIN_SCHEDULES}, got {main_schedule!r}")
        self._setup(uses_heun=True)

    def _segments(self, steps: int) -> tuple[int, tuple[Any, ...]]:
        cfg = self.config
        if cfg.restart_segments is not None:
            return steps, as_segments([(int(s[0]), int(s[1]), s[2], s[3]) for s in cfg.restart_segments])
        if cfg.restart_preset == "none":
            return steps, ()
        if cfg.restart_preset == "auto":
            return auto_segments(steps)
        return steps, get_preset(cfg.restart_preset).segments

    def _make_plan(
        self, grid: torch.Tensor | int, custom: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        cfg = self.config
        if custom:
            main = grid
            _, segs = self._segments(len(grid) - 1)
            if cfg.restart_segments is None and cfg.restart_preset == "auto":  # keep the given grid verbatim
                pos = main[main > 0]
                segs = tuple(s for s in segs if float(pos[-1]) <= s.t_min and s.t_max <= float(main[0]))
        else:
            n_main, segs = self._segments(grid)
            lo, hi = self._train_sigma_range(grid)
            main = self._karras_grid(n_main) if cfg.main_schedule == "karras" else self._default_grid(n_main)
            if cfg.restart_segments is None and cfg.restart_preset == "auto":
                segs = tuple(s for s in segs if lo <= s.t_min and s.t_max <= hi)
        plan = build_plan(main, segs, s_noise=cfg.s_noise, churn=cfg.restart_churn, churn_tmin=cfg.churn_tmin,
                          churn_tmax=cfg.churn_tmax, rho=cfg.rho)
        return plan.sigmas, plan.jumps, plan.main, "heun"

    def restart_plan(self) -> Any:
        """The flat :class:`~fastgen.samplers.restart.RestartPlan` of the current ``set_timesteps`` call."""
        from fastgen.samplers.restart import RestartPlan

        self._require_plan()
        return RestartPlan(self._flat[0], self._flat[1], float(self.config.s_noise), self._flat[2])
