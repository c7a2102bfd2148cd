"""Shortcut-model networks (Frans et al. 2025): the :class:`ShortcutNet` adapter, the fixed-step-size
:class:`ShortcutDenoiser`, and the ``"shortcut"`` denoiser wrapper of :mod:`fastgen.models.registry`.

A shortcut model ``s(x_t, t, d, **cond) -> velocity`` uses the rectified-flow convention t = 0 noise,
t = 1 data; ``t`` and ``d`` are ``(B,)`` tensors, ``d`` the step size in (0, 1]. Sampling lives in
:mod:`fastgen.samplers.shortcut`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import RectifiedFlowDenoiser
from fastgen.models.registry import register_wrapper

__all__ = ["ShortcutNet", "ShortcutDenoiser", "shortcut_denoiser", "num_levels"]


def num_levels(max_steps: int) -> int:
    """``log2(max_steps)``: the number of shortcut levels above the flow-matching step ``1/max_steps``."""
    bad = isinstance(max_steps, bool) or not isinstance(max_steps, int)
    if bad or max_steps < 1 or max_steps & (max_steps - 1):
        raise ValueError(f"num_steps must be a power of two >= 1, got {max_steps!r}")
    return int(round(math.log2(max_steps)))


class ShortcutNet(nn.Module):
    """Adapter from the shortcut call ``s(x_t, t, d, **cond)`` to a backbone ``net(x_t, t, d=d_in, **cond)``.

    Args:
        backbone: returns a velocity of the shape of ``x_t``; receives ``t`` (B,) raw in [0, 1]
            (t = 0 noise) and the keyword ``d_key`` = :meth:`d_input` (B,) in [0, 1].
        max_steps: M, a power of two; the smallest step is 1/M.
        d_key: the keyword under which the backbone takes the step-size input.
    """

    def __init__(self, backbone: nn.Module, max_steps: int = 128, d_key: str = "d") -> None:
        super().__init__()
        bad = isinstance(max_steps, bool) or not isinstance(max_steps, int)
        if bad or max_steps < 2 or max_steps & (max_steps - 1):
            raise ValueError(f"max_steps must be a power of two >= 2 (e.g. 128), got {max_steps!r}")
        self.backbone = backbone
        self.max_steps = int(max_steps)
        self.d_key = d_key

    def d_input(self, d: torch.Tensor) -> torch.Tensor:
        """``log2(1/d) / log2(M)``: 0 for d = 1, 1 for d = 1/M (the network's step-size input)."""
        return torch.log2(1 / d) / num_levels(self.max_steps)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = self.backbone(x_t, t, **{self.d_key: self.d_input(d)}, **cond)
        return out.sample if hasattr(out, "sample") else out


def shortcut_denoiser(net: nn.Module, max_steps: int = 128, d_key: str = "d") -> ShortcutDenoiser:
    """Denoiser type ``"shortcut"``: ``ShortcutDenoiser(ShortcutNet(net, max_steps, d_key), d=1/max_steps)``.

    The result is the model's flow-matching head as a VE denoiser (any fastgen solver); its ``.model``
    is the :class:`ShortcutNet` for :func:`fastgen.samplers.shortcut.shortcut_sample` (1 to ``max_steps`` steps).
    """
    return ShortcutDenoiser(ShortcutNet(net, max_steps, d_key), d=1.0 / max_steps)


class ShortcutDenoiser(RectifiedFlowDenoiser):
    """A shortcut model at a fixed step size ``d`` as a VE denoiser ``D(x, sigma, **cond)``.

    ``t = 1 / (1 + sigma)``, ``x_t = t * x``, ``D = x_t + (1 - t) * s(x_t, t, d)`` (the E[x1 | x_t] form
    of the velocity; :class:`fastgen.core.denoiser.RectifiedFlowDenoiser`). With ``d = 1/M`` (the
    flow-matching rows) this is the model's flow-matching denoiser; fastgen's ``euler`` on sigmas
    ``shortcut_t_to_sigma(t_grid)`` equals Euler in t.
    """

    def __init__(self, model: Callable[..., torch.Tensor], d: float) -> None:
        nn.Module.__init__(self)
        if not 0 < d <= 1:
            raise ValueError(f"d must be in (0, 1], got {d}")
        self.model = model
        self.d = float(d)
        self.sigma_min = None
        self.sigma_max = None

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.model(x_t, t, torch.full_like(t, self.d), **cond)


register_wrapper("shortcut", shortcut_denoiser)
