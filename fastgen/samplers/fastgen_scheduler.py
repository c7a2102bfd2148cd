"""``FastgenScheduler``: any fastgen schedule with any fastgen solver, as a Diffusers scheduler.

    pipe.scheduler = FastgenScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m",
                                                  schedule="my_ld3_schedule.json")

``solver``: ``euler`` | ``heun`` | ``dpmpp_2m`` | ``ipndm`` | ``unipc`` | ``unipc3`` (the formulas of
:mod:`fastgen.core.solvers`, one network call per timestep entry; Heun's corrector repeats the next
timestep, its step to 0 is Euler; UniPC's corrector refines the state each ``step`` receives with that
call's output, as Diffusers' ``UniPCMultistepScheduler`` does, so it costs no call). ``schedule``:

- ``"karras"`` (rho = ``rho``) or ``"loglinear"`` over the sigma range Diffusers' Euler (VP) or the
  shifted FlowMatch default grid (flow) spans for ``num_inference_steps``; with ``solver="euler",
  schedule="karras"`` and ``state_space="ve"`` (the default for non-DDPM VP configs) this reproduces
  ``EulerDiscreteScheduler(use_karras_sigmas=True)``;
- ``"default"``: exactly Diffusers' Euler (VP) / ``FlowMatchEulerDiscreteScheduler`` (flow, with its
  static or dynamic shift) default grid;
- a list of VE sigmas (strictly decreasing), used verbatim when ``num_inference_steps`` is its step
  count, otherwise resampled log-linearly (:func:`fastgen.core.schedules.resample`, endpoints kept).
  A list ending at a positive sigma (the AYS "knots" form) ends as ``terminal`` says: ``"replace"``
  (default: the last sigma becomes 0, same step count, as ``Schedule.solver_sigmas``), ``"append"``
  (one more step to 0) or ``"keep"`` (stop at the positive sigma);
- a path to a schedule JSON (``fastgen.samplers.schedule.Schedule.save``): a top-level ``"sigmas"``
  list (VE) and optional ``"solver"``; it is read once and stored in the config as a list, so
  ``save_pretrained`` is self-contained. A JSON solver that disagrees with an explicit ``solver``
  is a ``ValueError`` (a schedule learned for a solver is used with exactly that solver).

A list or JSON schedule must fit the model's training sigma range (the extremes of the VP training table, or
of the shifted flow grid at ``num_train_timesteps`` steps; any shift in ``[base_shift, max_shift]`` for
dynamic shifting): one that leaves it (e.g. an EDM schedule at sigma_max 80 in an SD config, whose table ends
at 14.6) is a ``ValueError`` naming both ranges; ``allow_schedule_range=True`` is the expert override.

``order`` is 2 for ``solver="heun"`` (as ``HeunDiscreteScheduler``), else 1.
``final_sigmas_type="sigma_min"`` (VP): the last step lands on sigma_min instead of 0.

Pipeline-given ``sigmas=``/``timesteps=`` (e.g. Flux always passes ``sigmas``) replace the schedule;
set ``use_flow_sigmas=True`` to make Flux pass none and use this scheduler's own schedule.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fastgen.core.ranges import check_schedule_fits, schedule_range, scheduler_sigma_range
from fastgen.core.schedules import TERMINALS, apply_terminal, loglinear, resample, validate_sigmas
from fastgen.core.solvers import SOLVERS
from fastgen.samplers._scheduler_base import PlanSchedulerMixin
from fastgen.samplers._scheduler_plan import FLOW_KEYS

SCHEDULE_NAMES = ("karras", "loglinear", "default")
# The solvers whose single steps the scheduler runs (``_SchedulerBase._advance``). UniPC's corrector refines the
# state a step() call receives with that call's model output (as Diffusers' UniPCMultistepScheduler does), so it
# needs no extra call and steps like the others (``fastgen.core.solvers.unipc_step``).
SCHEDULER_SOLVERS = tuple(SOLVERS)  # euler, heun, dpmpp_2m, ipndm, unipc, unipc3


def load_schedule_json(path: str | os.PathLike[str]) -> tuple[list[float], str | None]:
    """Read ``{"sigmas": [...], "solver": ...}``; validate the sigmas (VE, strictly decreasing)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"schedule {str(path)!r} is not a readable JSON file: {err}") from err
    if not isinstance(data, dict) or "sigmas" not in data:
        raise ValueError(f"schedule JSON {str(path)!r} must be an object with a top-level 'sigmas' list")
    if data.get("coefficients") is not None:
        raise ValueError(
            f"{os.fspath(path)} is a learned solver (it has 'coefficients'); FastgenScheduler cannot replay its "
            "combination of denoiser outputs: use Schedule.load(...).sample or `fastgen sample --schedule`"
        )
    sig = validate_sigmas(data["sigmas"], f"sigmas in {os.fspath(path)}")
    solver = data.get("solver")
    if solver is not None and solver not in SCHEDULER_SOLVERS:
        raise ValueError(
            f"solver in {os.fspath(path)} must be one of {list(SCHEDULER_SOLVERS)} for FastgenScheduler, got {solver!r}"
        )
    if data.get("eval_sigmas") is not None:
        warnings.warn(
            f"{os.fspath(path)} has eval_sigmas (LD3 decoupled evaluation points); FastgenScheduler evaluates "
            "the model at the step sigmas and ignores them (use Schedule.wrap with the functional solvers)",
            stacklevel=3,
        )
    return [float(v) for v in sig], solver


class FastgenScheduler(PlanSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Runs a fastgen schedule with a fastgen solver inside Diffusers pipelines (module docstring)."""

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
        solver: str | None = None,
        schedule: str | list[float] = "karras",
        rho: float = 7.0,
        terminal: str = "replace",
        allow_schedule_range: bool = False,
    ) -> None:
        if terminal not in TERMINALS:
            raise ValueError(f"terminal must be one of {TERMINALS}, got {terminal!r}")
        json_solver = None
        if isinstance(schedule, (str, os.PathLike)) and str(schedule) not in SCHEDULE_NAMES:
            if not os.path.isfile(schedule):
                raise ValueError(
                    f"schedule must be one of {SCHEDULE_NAMES}, a list of VE sigmas or a schedule JSON path; "
                    f"{str(schedule)!r} is none of these"
                )
            schedule, json_solver = load_schedule_json(schedule)
            self.register_to_config(schedule=schedule)
        elif not isinstance(schedule, str):
            schedule = [float(v) for v in validate_sigmas(schedule, "schedule")]
            self.register_to_config(schedule=schedule)
        if solver is not None and json_solver is not None and solver != json_solver:
            raise ValueError(
                f"solver={solver!r} but the schedule JSON was made for solver {json_solver!r}; "
                "use that solver or leave solver unset"
            )
        solver = solver or json_solver or "euler"
        if solver not in SCHEDULER_SOLVERS:
            raise ValueError(
                f"solver must be one of {list(SCHEDULER_SOLVERS)}, got {solver!r}"
            )
        self.register_to_config(solver=solver)
        self._setup(uses_heun=solver == "heun")
        if not isinstance(schedule, str):
            check_schedule_fits(schedule_range(schedule), self.model_sigma_range(), allow_schedule_range,
                                override="allow_schedule_range=True")

    def model_sigma_range(self) -> tuple[float, float]:
        """The VE ``(sigma_min, sigma_max)`` the configured model was trained on (module docstring)."""
        cfg = self.config
        if cfg.state_space != "flow":
            return float(self._vp.sigma_min), float(self._vp.sigma_max)
        flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", **{k: cfg[k] for k in FLOW_KEYS}}
        if not cfg.use_dynamic_shifting:
            return scheduler_sigma_range(flow)
        ranges = [scheduler_sigma_range(flow, mu=m) for m in (cfg.base_shift, cfg.max_shift)]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def _make_plan(self, grid: torch.Tensor | int, custom: bool) -> tuple[torch.Tensor, None, None, str]:
        cfg = self.config
        if not custom:
            n = grid
            if not isinstance(cfg.schedule, str):
                sig = torch.tensor(cfg.schedule, dtype=torch.float64)
                extra = 1 if (cfg.terminal == "append" and float(sig[-1]) > 0) else 0
                native = len(sig) - 1 + extra
                grid = apply_terminal(sig if n == native else resample(sig, n - extra), cfg.terminal)
            elif cfg.schedule == "default":
                grid = self._default_grid(n)
            elif cfg.schedule == "karras":
                grid = self._karras_grid(n)
            else:
                lo, hi = self._train_sigma_range(n)
                if self._final_sigma() > 0:  # n steps ending at sigma_min
                    grid = loglinear(n + 1, lo, hi)[:-1]
                    grid[-1] = self._final_sigma()
                else:
                    grid = loglinear(n, lo, hi)
        return validate_sigmas(grid, "sigmas").double(), None, None, cfg.solver
