"""The generator's DMD2 gradient (weighted by ``h~``) and the pseudo-target loss that applies it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dmd_gradient", "pseudo_target_loss"]


def dmd_gradient(
    x: torch.Tensor,
    d_teacher: torch.Tensor,
    d_fake: torch.Tensor,
    h_tilde: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """DMD2's normalised per-sample gradient, weighted by ``h~`` (detached, shape of x).

    ``g = h~ * ((x - D_T) - (x - D_fake)) / (mean_features |x - D_T| + eps)``; ``h~ = None`` means 1.
    """
    with torch.no_grad():
        x = x.detach()
        p_real = x - d_teacher
        p_fake = x - d_fake
        scale = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        if eps:
            scale = scale + eps
        g = (p_real - p_fake) / scale
        if h_tilde is not None:
            g = h_tilde.to(g.dtype).reshape(-1, *([1] * (x.ndim - 1))) * g
    return g


def pseudo_target_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``1/2 mean((x - sg(x - g))^2)``: its gradient with respect to ``x`` is ``g / x.numel()``."""
    return 0.5 * F.mse_loss(x.float(), (x - g).detach().float(), reduction="mean")
