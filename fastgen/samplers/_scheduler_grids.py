"""Sigma grids and ``set_timesteps`` of fastgen's Diffusers schedulers (a mixin of PlanSchedulerMixin).

Grids are VE sigmas (float64, decreasing, ending at the final sigma). Defaults follow Diffusers:
VP/VE configs use ``EulerDiscreteScheduler``'s grid for the config, flow configs
``FlowMatchEulerDiscreteScheduler``'s default grid (with its static or dynamic shift). Flow time
``t`` maps to VE sigma ``t / (1 - t)``, capped at ``FLOW_SIGMA_MAX``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastgen.core.schedules import flow_t_to_sigma, karras, sigma_to_flow_t, validate_sigmas
from fastgen.samplers._scheduler_plan import FLOW_KEYS, build_call_plan, shift_flow_t


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


class GridMixin:
    """Schedules of the plan schedulers; needs ``self.config``, ``self._vp``, ``self._beta_cfg``."""

    def _train_sigma_range(self, n: int) -> tuple[float, float]:
        """(sigma_min, sigma_max) that Diffusers' Euler (VP) / FlowMatchEuler (flow) default grid spans."""
        grid = self._default_grid(n, final="zero")
        lo, hi = float(grid[-2]) if n > 1 else float(grid[0]) / 10, float(grid[0])
        if self.config.sigma_min is not None:
            lo = float(self.config.sigma_min)
        if self.config.sigma_max is not None:
            hi = float(self.config.sigma_max)
        return lo, hi

    def _default_grid(self, n: int, mu: float | None = None, final: str | None = None) -> torch.Tensor:
        """The VE grid of Diffusers' Euler (VP) or FlowMatchEuler (flow) default schedule for n steps.

        ``final_sigmas_type="sigma_min"`` (VP): the n steps end at sigma_min (Euler's grid for n + 1
        points without its zero-length last step).
        """
        if self.config.state_space == "flow":
            from diffusers import FlowMatchEulerDiscreteScheduler

            flow = FlowMatchEulerDiscreteScheduler(**{k: self.config[k] for k in FLOW_KEYS})
            flow.set_timesteps(n, mu=mu if mu is not None else self._mu)
            return flow_t_to_sigma(flow.sigmas.double())
        from diffusers import EulerDiscreteScheduler

        final = final or self.config.final_sigmas_type
        keys = ("timestep_spacing", "steps_offset")
        euler = EulerDiscreteScheduler(**self._beta_cfg, **{k: self.config[k] for k in keys})
        if final == "sigma_min":
            euler.set_timesteps(n + 1)
            grid = euler.sigmas.double()[:-1].clone()
            grid[-1] = self._final_sigma()
            return grid
        euler.set_timesteps(n)
        return euler.sigmas.double()

    def _karras_grid(self, n: int) -> torch.Tensor:
        """Karras (``rho``) over the default grid's range; ends at sigma_min if ``final_sigmas_type`` says so."""
        lo, hi = self._train_sigma_range(n)
        if self.config.final_sigmas_type == "sigma_min" and self._vp is not None:
            grid = karras(n + 1, lo, hi, rho=self.config.rho)[:-1]
            grid[-1] = self._final_sigma()
            return grid
        return karras(n, lo, hi, rho=self.config.rho)

    def _flow_sigmas(self, t: Any, mu: float | None, shift: bool | None = None) -> torch.Tensor:
        """Flow times (N entries, or with a final 0) -> shifted (if configured) -> VE sigmas ending in 0."""
        t = _as_array(t).reshape(-1)
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
            sig = _as_array(sigmas)
            validate_sigmas(torch.from_numpy(sig.copy()), "sigmas")
            return (self._flow_sigmas(sig, mu) if flow else torch.from_numpy(sig.copy())), True
        ts = _as_array(timesteps)
        validate_sigmas(torch.from_numpy(ts.copy()), "timesteps")
        if flow:
            return self._flow_sigmas(ts / 1000.0, mu), True
        table = self._vp.table_sigmas.numpy()
        if ts[0] > len(table) - 1:
            raise ValueError(f"timesteps must lie in [0, {len(table) - 1}], got {ts[0]}")
        s = np.interp(ts, np.arange(len(table)), table)
        final = self._final_sigma()
        if s[-1] <= final:
            raise ValueError(
                f"timesteps end at t={ts[-1]} whose sigma {s[-1]:.6g} is not above the final sigma {final:.6g} "
                "(final_sigmas_type='sigma_min'); drop the last timestep"
            )
        return torch.from_numpy(np.concatenate([s, [final]])), True

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

        ``self.timesteps`` has one entry per network call. Resets the step counter, the begin index
        and all solver state.
        """
        grid, custom = self._main_sigmas(num_inference_steps, timesteps, sigmas, mu)
        flat, jumps, main, solver = self._make_plan(grid, custom)
        calls = build_call_plan(flat, solver, jumps, main)
        self._flat = (flat, jumps, main)
        self._calls = calls
        self._has_jumps = any(calls.jumps)
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
            return sigma_to_flow_t(sigma) * 1000.0
        return self._vp.sigma_to_t(sigma)

    def _timestep_to_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """VE sigma at (training or fractional) timesteps: flow ``t/1000 -> t/(1-t)``; VP log-sigma interpolation."""
        t = timestep.detach().to("cpu", torch.float64).reshape(-1)
        if self.config.state_space == "flow":
            return flow_t_to_sigma(t / 1000.0)
        log_table = self._vp.table_sigmas.log().numpy()
        n = len(log_table) - 1
        if (t < 0).any() or (t > n).any():
            raise ValueError(f"timesteps must lie in [0, {n}], got {t.tolist()}")
        return torch.from_numpy(np.exp(np.interp(t.numpy(), np.arange(n + 1), log_table)))
