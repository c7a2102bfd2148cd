"""Run Diffusers' own schedulers on any fastgen denoiser (the "in" direction reversed).

Benchmarks and the demo compare fastgen's samplers with Diffusers' schedulers *on the same model*.
A Diffusers scheduler needs a discrete VP training table and an epsilon-prediction model; a fastgen
denoiser is a VE ``D(x, sigma)``. This module builds both sides of that bridge:

- :func:`vp_config_for_range` -- a VP scheduler config whose 1000-entry table spans
  ``[sigma_min, sigma_max]`` log-uniformly (given as ``trained_betas``), so every Diffusers VP scheduler
  (Euler, DPM-Solver++, UniPC, DDIM, Heun, ...) works over the denoiser's own sigma range;
- :class:`EpsilonModelFromDenoiser` -- the exact inverse of
  :class:`fastgen.core.denoiser.DiffusersVPDenoiser`: it receives the VP model input and the
  (fractional) timestep, maps the timestep back to sigma through the same table (log-sigma linear
  interpolation, the inverse of Diffusers' ``_sigma_to_t``) and returns ``eps = (x - D) / sigma``;
- :func:`run_scheduler` -- the standard pipeline loop (``init_noise_sigma``, ``scale_model_input``,
  model, ``step``), returning the final sample and the number of model calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import sigma_batch


def vp_config_for_range(
    sigma_min: float, sigma_max: float, num_train_timesteps: int = 1000, **extra: Any
) -> dict[str, Any]:
    """A Diffusers VP scheduler config whose training table runs log-uniformly over the sigma range."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    sig = torch.logspace(
        torch.log10(torch.tensor(sigma_min, dtype=torch.float64)),
        torch.log10(torch.tensor(sigma_max, dtype=torch.float64)),
        num_train_timesteps,
        dtype=torch.float64,
    )
    abar = 1 / (1 + sig**2)
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = (1 - abar / prev).tolist()
    return {
        "num_train_timesteps": num_train_timesteps,
        "trained_betas": betas,
        "prediction_type": "epsilon",
        **extra,
    }


def table_sigmas(config: dict[str, Any]) -> torch.Tensor:
    """The VE sigma of every training timestep of a VP config (ascending in timestep)."""
    from fastgen.core.denoiser import vp_sigmas_from_config

    return vp_sigmas_from_config(config)


class EpsilonModelFromDenoiser(nn.Module):
    """``model(sample_vp, timestep, **cond) -> eps`` built from a VE denoiser and a VP table.

    ``timestep`` may be fractional; sigma is ``exp`` of the log-sigma table linearly interpolated at
    it. ``calls`` counts forward calls (one per network evaluation).
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], config: dict[str, Any]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.register_buffer("log_sigmas", table_sigmas(config).log(), persistent=False)
        self.calls = 0

    def timestep_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        ls = self.log_sigmas
        t = t.double().clamp(0, ls.shape[0] - 1)
        lo = t.floor().long().clamp(max=ls.shape[0] - 2)
        w = t - lo
        return (ls[lo] * (1 - w) + ls[lo + 1] * w).exp()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(timestep, device=sample.device)
        sigma = self.timestep_to_sigma(sigma_batch(t, sample).to(sample.device))
        sb = sigma.reshape(-1, *([1] * (sample.ndim - 1))).to(sample.dtype)
        x_ve = sample * (1 + sb**2).sqrt()
        denoised = self.denoiser(x_ve, sigma.to(sample.dtype), **cond)
        return (x_ve - denoised) / sb


@torch.no_grad()
def run_scheduler(
    scheduler: Any,
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    num_inference_steps: int,
    config: dict[str, Any],
    generator: torch.Generator | None = None,
    **cond: Any,
) -> tuple[torch.Tensor, int]:
    """Run a Diffusers ``scheduler`` (built from ``config``) on ``denoiser`` like a pipeline does.

    ``noise`` is standard normal ``(B, ...)``. Returns ``(x0, number_of_model_calls)``.
    """
    model = EpsilonModelFromDenoiser(denoiser, config).to(noise.device)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator} if generator is not None else {}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        eps = model(model_in, t, **cond)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return latents, model.calls
