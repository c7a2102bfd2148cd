"""One-step generators: :class:`OneStepStudent` ``student(z, cond) -> samples``, and the ``"student"``
denoiser wrapper of :mod:`fastgen.models.registry` that rebuilds one from a model JSON
(``"denoiser": {"type": "student", "sigma": 80.0, "wrap": {"type": "edm", ...}}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastgen.models.registry import register_wrapper
from fastgen.models.registry import wrap as apply_wrapper

__all__ = ["OneStepStudent", "student_wrapper"]


class OneStepStudent(nn.Module):
    """A one-step generator ``z (B, *sample_shape) -> x (B, *sample_shape)``.

    Args:
        net: a denoiser ``D(x, sigma, **cond)`` when ``sigma`` is given, else a generator ``net(z, **cond)``.
        sigma: the noise level at which the denoiser is evaluated (``x = D(sigma z, sigma)``), or None.
        recipe: optional JSON-able ``{"network": <recipe>, "wrap": <spec or None>}`` that rebuilds ``net``
            (see :func:`build_network_from_recipe`, :func:`wrap_network`; needed by :func:`save_student`).

    ``forward(z, cond=None, **kw)``: ``cond`` may be a class-label tensor (passed as
    ``class_labels=``) or a mapping of keyword conditions.
    """

    def __init__(
        self, net: nn.Module, sigma: float | None = None, recipe: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        if sigma is not None and not sigma > 0:
            raise ValueError(f"student sigma must be > 0 (or None for a plain generator), got {sigma}")
        self.net = net
        self.sigma = None if sigma is None else float(sigma)
        self.recipe = dict(recipe) if recipe is not None else None

    def forward(self, z: torch.Tensor, cond: Any = None, **kw: Any) -> torch.Tensor:
        if isinstance(cond, torch.Tensor):
            kw = {"class_labels": cond, **kw}
        elif isinstance(cond, Mapping):
            kw = {**cond, **kw}
        elif cond is not None:
            raise ValueError(f"cond must be a label tensor, a mapping or None, got {type(cond).__name__}")
        if self.sigma is None:
            return self.net(z, **kw)
        return self.net(
            z * self.sigma, torch.full((z.shape[0],), self.sigma, device=z.device, dtype=z.dtype), **kw
        )


def student_wrapper(
    net: nn.Module, sigma: float | None = None, wrap: Mapping[str, Any] | None = None
) -> OneStepStudent:
    """Denoiser type ``"student"``: the one-step student around a loaded bare network ``net``, with the
    inner wrapper spec ``wrap`` (None: bare), evaluated at ``sigma`` (None: a plain generator)."""
    return OneStepStudent(apply_wrapper(net, wrap), sigma=sigma, recipe={"network": None, "wrap": wrap})


register_wrapper("student", student_wrapper)
