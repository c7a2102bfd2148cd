"""Few-step generators: a denoiser sampled by Euler on a fixed sigma grid (SFD and BOSS students).

:class:`FewStepStudent` is a :class:`~fastgen.models.onestep.OneStepStudent` (so ``load_model`` serves it as
a ``student`` and ``fastgen sample --model`` runs it) whose forward pass is a fixed Euler rollout:

    x_0 = sigmas[0] * z;   x_{i+1} = x_i + (sigmas[i+1] - sigmas[i]) (x_i - D(x_i, sigmas[i])) / sigmas[i]

over VE sigmas (``D`` the EDM-contract denoiser, ``x = x0 + sigma eps``). With ``afs=True`` the first step is
SFD's analytic first step (no network call, :func:`afs_step`). The final sigma may be 0 (BOSS: the last step
lands on the data) or positive (SFD: the rollout stops at ``sigma_min``, no final denoise).
``nfe = len(sigmas) - 1 - afs`` network calls per sample.

The ``"fewstep"`` denoiser wrapper of :mod:`fastgen.models.registry` rebuilds one from a model JSON::

    "denoiser": {"type": "fewstep", "sigmas": [80.0, 10.93, 0.67, 0.006], "afs": true,
                 "step_scalar": null, "wrap": {"type": "edm", "sigma_data": 0.5}}

``step_scalar`` (SFD-v): the name of a scalar condition of the network that receives the grid's number of
timestamps (``len(sigmas)``) at every call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastgen.core.solvers import euler_step
from fastgen.models.onestep import OneStepStudent
from fastgen.models.registry import register_wrapper
from fastgen.models.registry import wrap as apply_wrapper

__all__ = ["FewStepStudent", "afs_step", "check_grid", "fewstep_wrapper"]


def afs_step(x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """SFD's analytic first step (VE): ``x + (sigma_next - sigma) x / sqrt(1 + sigma^2)`` (no network call).

    The Euler step of the derivative ``d = x / sqrt(1 + sigma^2)``; at ``sigma = 80`` that is the derivative
    ``x / sigma`` of a denoiser predicting the data mean 0, to ``1 / (2 sigma^2) = 8e-5`` relative.
    Valid for centred data with std << sigma.
    """
    return x * (1 + (float(sigma_next) - float(sigma)) / math.sqrt(1 + float(sigma) ** 2))


def check_grid(sigmas: Sequence[float], afs: bool, what: str = "sigmas") -> list[float]:
    """``sigmas`` as floats: at least 2, finite, strictly decreasing, the last >= 0, the others > 0;
    with ``afs`` at least 3 (the analytic step alone calls no network). ``ValueError`` naming ``what``."""
    try:
        s = [float(v) for v in sigmas]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a list of numbers, got {sigmas!r}") from err
    need = 3 if afs else 2
    if len(s) < need:
        raise ValueError(f"{what} must have at least {need} entries{' with afs' if afs else ''}, got {len(s)}")
    if not all(math.isfinite(v) for v in s) or any(v <= 0 for v in s[:-1]) or s[-1] < 0:
        raise ValueError(f"{what} must be finite, positive (the last may be 0), got {s}")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"{what} must be strictly decreasing, got {s}")
    return s


class FewStepStudent(OneStepStudent):
    """``z (B, *shape) -> x (B, *shape)`` by a fixed Euler rollout of the denoiser ``net`` (see module doc).

    Args:
        net: an EDM-contract denoiser ``D(x, sigma, **cond)``.
        sigmas: the VE grid, strictly decreasing, the last entry >= 0.
        afs: take the first step analytically (:func:`afs_step`, no network call).
        step_scalar: SFD-v: the network's scalar condition that receives ``len(sigmas)``.
        recipe: ``{"network": ..., "wrap": ...}`` to rebuild ``net`` (as for one-step students).
    """

    def __init__(
        self, net: nn.Module, sigmas: Sequence[float], afs: bool = False, step_scalar: str | None = None,
        recipe: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(net, sigma=None, recipe=recipe)
        self.sigmas = check_grid(sigmas, afs)
        self.afs = bool(afs)
        self.step_scalar = step_scalar

    @property
    def nfe(self) -> int:
        """Network calls per sample."""
        return len(self.sigmas) - 1 - int(self.afs)

    def spec(self) -> dict[str, Any]:
        """The JSON ``denoiser`` section that rebuilds this student (``"type": "fewstep"``)."""
        return {"type": "fewstep", "sigmas": list(self.sigmas), "afs": self.afs, "step_scalar": self.step_scalar,
                "wrap": (self.recipe or {}).get("wrap")}

    def forward(self, z: torch.Tensor, cond: Any = None, **kw: Any) -> torch.Tensor:
        kw = self.cond_kwargs(cond, kw)
        if self.step_scalar:
            kw[self.step_scalar] = float(len(self.sigmas))
        s = self.sigmas
        x = z * s[0]
        start = 0
        if self.afs:
            x, start = afs_step(x, s[0], s[1]), 1
        for i in range(start, len(s) - 1):
            sig = torch.full((z.shape[0],), s[i], device=z.device, dtype=z.dtype)
            x = euler_step(x, self.net(x, sig, **kw), s[i], s[i + 1])
        return x


def fewstep_wrapper(
    net: nn.Module, sigmas: Sequence[float], afs: bool = False, step_scalar: str | None = None,
    wrap: Mapping[str, Any] | None = None,
) -> FewStepStudent:
    """Denoiser type ``"fewstep"``: the few-step student around a loaded bare network ``net``."""
    return FewStepStudent(apply_wrapper(net, wrap), sigmas, afs=afs, step_scalar=step_scalar,
                          recipe={"network": None, "wrap": wrap})


register_wrapper("fewstep", fewstep_wrapper)
