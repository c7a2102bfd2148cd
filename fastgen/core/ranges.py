"""The VE sigma range a model was trained on, and the check that a schedule fits it.

One home for both, used by :func:`fastgen.models.load_model` (``LoadedModel.sigma_range``, recorded in every
schedule JSON), ``fastgen sample --schedule`` and :class:`fastgen.samplers.FastgenScheduler` (which refuses a
schedule learned for another model's range, e.g. an EDM digits schedule at sigma_max 80 inside an SD pipeline
whose training table ends at 14.6).
"""

from __future__ import annotations

from typing import Any

import torch

from fastgen.core.schedules import diffusers_table, is_flow_config

#: Relative slack of :func:`check_schedule_fits`: sigmas stored in JSON and float32 tables round at ~1e-7.
RANGE_RTOL = 1e-4


def scheduler_sigma_range(scheduler_config: Any, **set_timesteps_kwargs: Any) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` (VE, positive, finite) of a Diffusers scheduler config's training grid.

    - VP configs (DDPM/SD): the extremes of the ``num_train_timesteps`` training sigmas
      ``sqrt((1 - abar_t) / abar_t)`` (t = 0 .. T-1);
    - flow configs (SD3/Flux): the positive extremes of FlowMatchEuler's grid at ``num_train_timesteps``
      steps with the config's shift (``mu=`` for dynamic shifting), in VE ``t / (1 - t)``.
    """
    config = dict(scheduler_config)
    if is_flow_config(config):
        table = diffusers_table(config, int(config.get("num_train_timesteps", 1000)), **set_timesteps_kwargs)
        pos = table[table > 0]
        return float(pos.min()), float(pos.max())
    from fastgen.core.denoiser import vp_sigmas_from_config

    table = vp_sigmas_from_config(config)
    return float(table[0]), float(table[-1])


def schedule_range(sigmas: Any) -> tuple[float, float]:
    """``(smallest positive, largest)`` sigma of a schedule (a terminal 0 is not part of its range)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    pos = s[s > 0]
    if pos.numel() == 0:
        raise ValueError("a schedule needs at least one positive sigma")
    return float(pos.min()), float(pos.max())


def check_schedule_fits(
    schedule_range: tuple[float, float], model_range: tuple[float, float], allow: bool = False,
    rtol: float = RANGE_RTOL, override: str = "--allow-schedule-range",
) -> None:
    """Refuse a schedule whose positive sigmas ``[lo, hi]`` leave the model's ``[sigma_min, sigma_max]``.

    ``ValueError`` naming both ranges and the override (``override``, e.g. the CLI flag or the scheduler's
    ``allow_schedule_range=True``) unless ``allow``. ``rtol`` absorbs float rounding of stored sigmas.
    """
    if allow:
        return
    lo, hi = float(schedule_range[0]), float(schedule_range[1])
    mlo, mhi = float(model_range[0]), float(model_range[1])
    if hi > mhi * (1 + rtol) or lo < mlo * (1 - rtol):
        raise ValueError(
            f"schedule sigma range [{lo:.6g}, {hi:.6g}] does not fit the model's sigma range "
            f"[{mlo:.6g}, {mhi:.6g}]; learn a schedule for this model or pass {override} "
            "if you know what you are doing"
        )
