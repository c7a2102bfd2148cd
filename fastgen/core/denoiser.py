"""The denoiser contract and the adapters that map models into it.

Contract (EDM, Karras et al. 2022)::

    D(x, sigma, **cond) -> x0_hat          x = x0 + sigma * eps   (VE-scaled state)

- ``x``: tensor ``(B, ...)``; ``sigma``: a float, a 0-d tensor or a ``(B,)`` tensor of VE sigmas
  (> 0); the result has the shape and dtype of ``x``.
- Each denoiser may expose ``sigma_min`` / ``sigma_max`` (the range it was trained on) or ``None``.

Adapters:

- :class:`EDMDenoiser` -- an EDM-preconditioned network ``net(c_in x, c_noise, **cond)``.
- :class:`DiffusersVPDenoiser` -- Diffusers discrete VP models (``epsilon``, ``v_prediction``,
  ``sample``), model time interpolated from sigma over the training table in log-sigma.
- :class:`DiffusersFlowDenoiser` -- Diffusers flow-matching models (velocity ``eps - x0``),
  ``x_fm = x / (1 + sigma)``, ``t = sigma / (1 + sigma)``.
- :func:`from_diffusers` -- picks the right Diffusers adapter for a model + scheduler config or a
  pipeline object.

The exact analytic denoisers (Gaussian mixture, empirical) live in :mod:`fastgen.core.analytic`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from fastgen.core.schedules import rf_t_to_sigma, sigma_to_timestep


class Denoiser(Protocol):
    """``D(x, sigma, **cond) -> x0_hat``; see the module docstring for shapes and units."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor: ...


def sigma_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return sigma as a ``(B,)`` tensor on x's device (dtype float of x, at least float32)."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    s = torch.as_tensor(sigma, device=x.device, dtype=dtype) if not isinstance(sigma, torch.Tensor) else sigma
    s = s.to(device=x.device, dtype=dtype)
    if s.ndim == 0:
        return s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(s.shape)}")
    return s


def _check_device(x: torch.Tensor, buffer: torch.Tensor, owner: str) -> None:
    if x.device != buffer.device:
        raise ValueError(
            f"x is on {x.device} but the {owner}'s parameters are on {buffer.device}; "
            f"accepted: x on {buffer.device} (or move the denoiser with .to(x.device))"
        )


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _model_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, a .sample output or a tuple")


# --------------------------------------------------------------------------------------------
# EDM preconditioning
# --------------------------------------------------------------------------------------------


class EDMDenoiser(nn.Module):
    """EDM preconditioning around ``net(x_in, c_noise, **cond) -> F``.

    ``D = c_skip x + c_out F(c_in x, c_noise)`` with ``c_skip = sd^2/(s^2+sd^2)``,
    ``c_out = s sd / sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``, ``c_noise = log(s)/4``.
    """

    def __init__(
        self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0
    ) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(c_skip, c_out, c_in, c_noise)`` for a sigma tensor."""
        sd2 = self.sigma_data**2
        s2 = sigma**2
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        s = sigma_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(s)
        f = _model_output(self.net((_bcast(c_in, x) * x).to(x.dtype), c_noise.to(x.dtype), **cond))
        return (_bcast(c_skip, x) * x + _bcast(c_out, x) * f.to(x.dtype)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Diffusers adapters
# --------------------------------------------------------------------------------------------

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def vp_sigmas_from_config(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """Training-table sigmas ``sqrt((1 - abar) / abar)`` (ascending in timestep) of a VP config.

    ``alphas_cumprod`` is taken from Diffusers' own ``DDPMScheduler`` so every ``beta_schedule``
    (linear, scaled_linear, squaredcos_cap_v2, trained betas, ...) is handled exactly as Diffusers does.
    """
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    sched = DDPMScheduler.from_config(cfg)
    abar = sched.alphas_cumprod.double()
    if cfg.get("rescale_betas_zero_snr", False):
        # Zero terminal SNR has abar[-1] = 0 (infinite sigma); Diffusers' Euler uses 2**-24 there.
        abar[-1] = 2.0**-24
    return ((1 - abar) / abar).sqrt()


def vp_output_to_x0(
    out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
    """x0 from a VP model output at VE state ``x`` and VE ``sigma`` (a float or a tensor broadcast to x).

    ``epsilon``: ``x - sigma out``; ``v_prediction`` (``v = a eps - b x0`` with ``a = 1/sqrt(1+s^2)``,
    ``b = s a``): ``a (a x) - s a out``; ``sample``: ``out``. A learned-variance output (twice the
    channels of ``x``) keeps its mean half. The one home of this conversion (adapter and schedulers).
    """
    if out.ndim > 1 and out.shape[1] == 2 * x.shape[1]:
        out = out[:, : x.shape[1]]
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        scale = (1 + sigma * sigma) ** -0.5
        return scale * (x * scale) - (sigma * scale) * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def flow_output_to_x0(velocity: torch.Tensor, x_fm: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x0 from a flow model's velocity ``eps - x0`` at flow state ``x_fm = (1 - t) x0 + t eps``: ``x_fm - t v``."""
    return x_fm - t * velocity


class DiffusersVPDenoiser(nn.Module):
    """A Diffusers discrete VP model (DDPM/SD UNets) seen as a VE denoiser.

    The model receives ``x / sqrt(1 + sigma^2)`` and the (fractional) timestep ``t(sigma)``
    obtained by linear interpolation of ``t`` in ``log sigma`` over the training table (the rule
    of Diffusers' ``_sigma_to_t``). ``cond`` is passed to the model as keywords
    (``encoder_hidden_states=...``, ``class_labels=...``).
    """

    def __init__(
        self,
        model: nn.Module | Callable[..., Any],
        scheduler_config: Mapping[str, Any],
        prediction_type: str | None = None,
    ) -> None:
        super().__init__()
        cfg = dict(scheduler_config)
        prediction_type = prediction_type or cfg.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.model = model
        self.prediction_type = prediction_type
        table = vp_sigmas_from_config(cfg)
        self.register_buffer("table_sigmas", table, persistent=False)
        self.sigma_min = float(table[0])
        self.sigma_max = float(table[-1])
        self.config = cfg

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep for VE sigma(s), clamped to the table's range."""
        return sigma_to_timestep(sigma, self.table_sigmas.to(sigma.device))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        s = sigma_batch(sigma, x)
        sb = _bcast(s, x)
        scale = 1 / (sb**2 + 1).sqrt()
        x_in = (x * scale).to(x.dtype)
        t = self.sigma_to_t(s).to(torch.float32)
        out = _model_output(self.model(x_in, timestep=t, **cond))
        return vp_output_to_x0(out.to(x.dtype), x, sb, self.prediction_type)


class DiffusersFlowDenoiser(nn.Module):
    """A Diffusers flow-matching model (SD3/Flux style, velocity ``eps - x0``) as a VE denoiser.

    ``x_fm = x / (1 + sigma)``, flow time ``t = sigma / (1 + sigma)``; the model receives
    ``timestep = t * timestep_scale`` (1000 for SD3 transformers; Flux pipelines divide by 1000
    before calling their transformer, so use 1.0 there). ``x0 = x_fm - t v``.
    """

    def __init__(self, model: nn.Module | Callable[..., Any], timestep_scale: float = 1000.0,
                 sigma_min: float | None = None, sigma_max: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.timestep_scale = float(timestep_scale)
        # the scheduler grid's VE range (fastgen.core.ranges.scheduler_sigma_range), e.g. [0.001, 1000]
        self.sigma_min = None if sigma_min is None else float(sigma_min)
        self.sigma_max = None if sigma_max is None else float(sigma_max)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        s = sigma_batch(sigma, x)
        t = s / (1 + s)
        x_fm = (x / (1 + _bcast(s, x))).to(x.dtype)
        return self.flow_x0(x_fm, t, **cond)

    def flow_x0(self, x_fm: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """x0 from the flow state ``x_fm`` at flow time ``t`` (B,) in [0, 1] (1 = noise, reachable here:
        one-step flow students evaluate ``t = 1`` exactly, which has no finite VE sigma)."""
        timestep = (t * self.timestep_scale).to(x_fm.dtype)
        v = _model_output(self.model(x_fm, timestep=timestep, **cond)).to(x_fm.dtype)
        return flow_output_to_x0(v, x_fm, _bcast(t, x_fm))


def rf_velocity(denoiser: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
    """Rectified-flow velocity ``(D(x_t/t, (1-t)/t) - x_t) / (1 - t)`` of a VE denoiser (the inverse of
    :class:`RectifiedFlowDenoiser`); ``t`` (B,) in (0, 1), rectified-flow time (0 = noise, 1 = data)."""
    tb = t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    sigma = rf_t_to_sigma(t).to(x_t.dtype)
    return (denoiser(x_t / tb, sigma, **cond) - x_t) / (1 - tb)


class RectifiedFlowDenoiser(nn.Module):
    """A rectified-flow velocity model as a VE denoiser (fastgen's own flow and shortcut models).

    The model is ``net(x_t, t, **cond) -> v`` in the rectified-flow convention: ``t = 0`` noise,
    ``t = 1`` data, ``x_t = (1 - t) x0 + t x1``, ``v = x1 - x0`` (the opposite direction to Diffusers'
    flow time). With ``t = 1 / (1 + sigma)`` and ``x_t = t x``: ``D = E[x1 | x_t] = x_t + (1 - t) v``.
    Subclasses change how the velocity is obtained by overriding :meth:`velocity`.
    """

    def __init__(self, net: nn.Module | Callable[..., Any]) -> None:
        super().__init__()
        self.net = net
        self.sigma_min = None
        self.sigma_max = None

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """``v(x_t, t)`` with ``t`` of shape (B,)."""
        return _model_output(self.net(x_t, t, **cond))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        s = sigma_batch(sigma, x)
        t = 1 / (1 + s)
        tb = _bcast(t, x)
        x_t = (tb * x).to(x.dtype)
        v = self.velocity(x_t, t.to(x.dtype), **cond).to(x.dtype)
        return (x_t + (1 - tb) * v).to(x.dtype)


def from_diffusers(
    model_or_pipeline: Any,
    scheduler_config: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
    timestep_scale: float | None = None,
) -> nn.Module:
    """Adapt a Diffusers model (with its scheduler config) or a pipeline into a VE denoiser.

    - ``from_diffusers(unet, pipe.scheduler.config)`` or ``from_diffusers(pipe)``.
    - Flow-matching configs (``FlowMatch*`` schedulers) give a :class:`DiffusersFlowDenoiser`;
      pipelines whose transformer is Flux-style get ``timestep_scale = 1`` automatically.
    """
    model = model_or_pipeline
    if scheduler_config is None:
        sched = getattr(model_or_pipeline, "scheduler", None)
        if sched is None:
            raise ValueError("scheduler_config is required unless a pipeline with a .scheduler is given")
        scheduler_config = sched.config
        model = getattr(model_or_pipeline, "unet", None)
        if model is None:
            model = getattr(model_or_pipeline, "transformer", None)
        if model is None:
            raise ValueError("pipeline has neither .unet nor .transformer")
    cfg = dict(scheduler_config)
    name = str(cfg.get("_class_name", ""))
    if "FlowMatch" in name or ("shift" in cfg and "beta_schedule" not in cfg):
        if timestep_scale is None:
            timestep_scale = 1.0 if "Flux" in type(model).__name__ else 1000.0
        lo = hi = None
        if not cfg.get("use_dynamic_shifting"):  # dynamic shifting: the range depends on the image size (mu)
            from fastgen.core.ranges import scheduler_sigma_range

            lo, hi = scheduler_sigma_range(cfg)
        return DiffusersFlowDenoiser(model, timestep_scale=timestep_scale, sigma_min=lo, sigma_max=hi)
    return DiffusersVPDenoiser(model, cfg, prediction_type=prediction_type)
