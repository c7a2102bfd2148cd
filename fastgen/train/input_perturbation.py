"""DDPM-IP input perturbation (Ning et al., ICML 2023) as an option of the EDM and flow-matching methods.

DDPM-IP builds the network *input* from a slightly larger noise ``n + gamma xi`` (``xi ~ N(0, I)``
independent, ``gamma ~ 0.1``) while the regression target keeps the original noise ``n``, so the network
learns to handle inputs carrying the error a sampler accumulates (exposure bias). Sampling is unchanged.
See ``../shared/methods/ddpm-ip.md`` (section 3 derives the transfer to EDM and flow matching).

Both transfers below are written as a change of the ``(data, noise)`` pair handed to the *unchanged* loss
(:func:`fastgen.train.edm.edm_loss`, :func:`fastgen.train.flow.flow_matching_loss`), so the loss formula
lives in one place:

- **EDM / VE** (``x = y + sigma * noise``, target ``D -> y``):

  - ``ip_target="eps"`` (faithful: the epsilon-equivalent target keeps ``n``): input
    ``x = y + sigma (n + gamma xi)`` and target ``D -> x - sigma n = y + sigma gamma xi``; that is the EDM loss
    on the data ``y' = y + sigma gamma xi`` with noise ``n``.
  - ``ip_target="x0"`` (relabel): same input, target ``D -> y``; the EDM loss on ``y`` with noise
    ``n + gamma xi`` (learns ``D*(x; sigma sqrt(1 + gamma^2))`` at the nominal sigma).

- **Flow matching** (rectified-flow convention, ``t = 0`` noise ``x0``, ``x_t = (1 - t) x0 + t x1``,
  target ``x1 - x0``):

  - ``"eps"`` (faithful): input ``x_t = (1 - t)(x0 + gamma xi) + t x1``, target ``x1 - x0``; the flow loss on
    ``(x1 + d, x0 + d)`` with ``d = (1 - t) gamma xi`` (same ``x_t``, same difference).
  - ``"x0"`` (relabel): the flow loss on ``(x1, x0 + gamma xi)``: plain flow matching from a broader prior.

In both, ``Var(input - signal part) = (noise scale)^2 (1 + gamma^2)`` while the network is told the nominal
``sigma`` / ``t``; EDM's ``c_in`` stays nominal (as in the official ADM code).

**Random stream.** ``xi`` is drawn from a *separate* generator derived from the step's generator
(:func:`ip_generator`), and nothing is drawn when ``gamma == 0``. So ``gamma = 0`` reproduces the baseline
bit for bit, and a ``gamma > 0`` run sees exactly the baseline's sigmas, noises and label drops (paired runs).
"""

from __future__ import annotations

import math

import torch

__all__ = ["IP_TARGETS", "check_ip", "ip_generator", "ip_noise", "perturb_edm", "perturb_flow"]

#: Accepted ``ip_target`` values: ``eps`` (faithful DDPM-IP) and ``x0`` (noise-level relabelling).
IP_TARGETS = ("eps", "x0")

_IP_STREAM = 0x5EED_1B7E_D0D0_0001  # mixes the step generator's seed into the perturbation stream


def check_ip(input_perturbation: float, ip_target: str) -> tuple[float, str]:
    """Validated ``(gamma, ip_target)``: ``gamma`` finite in [0, 1], ``ip_target`` one of :data:`IP_TARGETS`."""
    try:
        gamma = float(input_perturbation)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"input_perturbation must be a number in [0, 1] (0 = off), got {input_perturbation!r}"
        ) from err
    if not (math.isfinite(gamma) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"input_perturbation must be a number in [0, 1] (0 = off; DDPM-IP uses 0.1), got {gamma}")
    if ip_target not in IP_TARGETS:
        raise ValueError(f"ip_target must be one of {IP_TARGETS}, got {ip_target!r}")
    return gamma, ip_target


def ip_generator(generator: torch.Generator) -> torch.Generator:
    """A generator for ``xi`` on ``generator``'s device, seeded from ``generator.initial_seed()``.

    It does not advance ``generator``, so the method's other draws are those of the baseline run.
    """
    seed = (int(generator.initial_seed()) * 0x9E3779B97F4A7C15 + _IP_STREAM) % 2**63
    return torch.Generator(device=generator.device).manual_seed(seed)


def ip_noise(like: torch.Tensor, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """``gamma * xi`` with ``xi ~ N(0, I)`` of ``like``'s shape, device and dtype, from :func:`ip_generator`."""
    g = ip_generator(generator)
    xi = torch.randn(like.shape, generator=g, device=g.device).to(like.device, like.dtype)
    return gamma * xi


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def perturb_edm(
    x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, gxi: torch.Tensor, ip_target: str = "eps"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(data, noise)`` to hand to ``edm_loss`` for IP perturbation ``gxi = gamma * xi``.

    ``x0, noise, gxi``: (B, ...); ``sigma``: (B,) VE noise levels. The loss then sees the input
    ``x0 + sigma (noise + gxi)`` and the target of ``ip_target`` (module doc).
    """
    if ip_target == "eps":
        return x0 + _bcast(sigma, x0).to(x0.dtype) * gxi, noise
    if ip_target == "x0":
        return x0, noise + gxi
    raise ValueError(f"ip_target must be one of {IP_TARGETS}, got {ip_target!r}")


def perturb_flow(
    x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, gxi: torch.Tensor, ip_target: str = "eps"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(x1, x0)`` (data, noise) to hand to ``flow_matching_loss`` for IP perturbation ``gxi``.

    ``t``: (B,) rectified-flow times (0 = noise). The loss then sees ``x_t = (1 - t)(x0 + gxi) + t x1`` and
    the target ``x1 - x0`` (``"eps"``) or ``x1 - x0 - gxi`` (``"x0"``).
    """
    if ip_target == "eps":
        d = (1 - _bcast(t, x1)).to(x1.dtype) * gxi
        return x1 + d, x0 + d
    if ip_target == "x0":
        return x1, x0 + gxi
    raise ValueError(f"ip_target must be one of {IP_TARGETS}, got {ip_target!r}")
