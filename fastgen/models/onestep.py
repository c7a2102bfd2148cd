"""One-step generators: :class:`OneStepStudent` ``student(z, cond) -> samples``, and the ``"student"``
denoiser wrapper of :mod:`fastgen.models.registry` that rebuilds one from a model JSON
(``"denoiser": {"type": "student", "sigma": 80.0, "wrap": {"type": "edm", ...}}``; flow students carry
``"flow_t": 1.0`` instead of a sigma)."""

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
        flow_t: flow students (Diffusers flow time, 1 = noise): ``x = net.flow_x0(flow_t z, flow_t)``, the
            flow state ``t z`` being the VE state ``sigma z`` at ``t = sigma / (1 + sigma)``; ``t = 1`` (no
            finite sigma) is the flow model's own one-step prediction ``z - v(z, 1)``.
        recipe: optional JSON-able ``{"network": <recipe>, "wrap": <spec or None>}`` that rebuilds ``net``
            (see :func:`build_network_from_recipe`, :func:`wrap_network`; needed by :func:`save_student`).

    ``forward(z, cond=None, **kw)``: ``cond`` may be a class-label tensor (passed as
    ``class_labels=``) or a mapping of keyword conditions.
    """

    def __init__(
        self, net: nn.Module, sigma: float | None = None, recipe: Mapping[str, Any] | None = None,
        flow_t: float | None = None,
    ) -> None:
        super().__init__()
        if sigma is not None and not sigma > 0:
            raise ValueError(f"student sigma must be > 0 (or None for a plain generator), got {sigma}")
        if flow_t is not None:
            if sigma is not None:
                raise ValueError("give the student either sigma (VE) or flow_t (flow time), not both")
            if not 0 < flow_t <= 1:
                raise ValueError(f"student flow_t must be in (0, 1] (1 = pure noise), got {flow_t}")
            if not callable(getattr(net, "flow_x0", None)):
                raise ValueError(f"flow_t needs a flow denoiser with .flow_x0 (DiffusersFlowDenoiser), "
                                 f"got {type(net).__name__}")
        self.net = net
        self.sigma = None if sigma is None else float(sigma)
        self.flow_t = None if flow_t is None else float(flow_t)
        self.recipe = dict(recipe) if recipe is not None else None

    @staticmethod
    def cond_kwargs(cond: Any, kw: dict[str, Any]) -> dict[str, Any]:
        """The network keywords of a student call: ``cond`` is a label tensor (``class_labels``), a mapping of
        keywords, or None; explicit ``kw`` win."""
        if isinstance(cond, torch.Tensor):
            return {"class_labels": cond, **kw}
        if isinstance(cond, Mapping):
            return {**cond, **kw}
        if cond is not None:
            raise ValueError(f"cond must be a label tensor, a mapping or None, got {type(cond).__name__}")
        return kw

    def forward(self, z: torch.Tensor, cond: Any = None, **kw: Any) -> torch.Tensor:
        kw = self.cond_kwargs(cond, kw)
        if self.flow_t is not None:
            t = torch.full((z.shape[0],), self.flow_t, device=z.device, dtype=z.dtype)
            return self.net.flow_x0(z * self.flow_t, t, **kw)
        if self.sigma is None:
            return self.net(z, **kw)
        return self.net(
            z * self.sigma, torch.full((z.shape[0],), self.sigma, device=z.device, dtype=z.dtype), **kw
        )


def student_wrapper(
    net: nn.Module, sigma: float | None = None, wrap: Mapping[str, Any] | None = None,
    flow_t: float | None = None,
) -> OneStepStudent:
    """Denoiser type ``"student"``: the one-step student around a loaded bare network ``net``, with the
    inner wrapper spec ``wrap`` (None: bare), evaluated at ``sigma`` or flow time ``flow_t`` (neither: a
    plain generator)."""
    return OneStepStudent(apply_wrapper(net, wrap), sigma=sigma, recipe={"network": None, "wrap": wrap},
                          flow_t=flow_t)


register_wrapper("student", student_wrapper)


def attach_pipeline(loaded: Any, source: str, folder: Any, device: Any = "cpu") -> Any:
    """Give a loaded text-to-image student (a :class:`~fastgen.models.sources.LoadedModel`) its teacher
    pipeline's prompt encoder and VAE decoder: ``conditioning = "prompt"``, ``encode_prompt``, ``decoder``.

    ``source`` is the student JSON's ``"pipeline"``: a shipped pipeline name (``digits-sd``) or a folder,
    relative paths taken from the student's ``folder`` first. ``FileNotFoundError`` names it when absent.
    """
    from pathlib import Path

    from fastgen.models.sources import load_model

    src = str(source)
    local = Path(folder) / src
    if not Path(src).is_absolute() and (local / "model_index.json").is_file():
        src = str(local)
    try:
        pipe = load_model(src, device)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"student pipeline {source!r} (its tokenizer, text encoders and VAE) not found: "
                                f"{err}") from err
    if pipe.conditioning != "prompt":
        raise ValueError(f"student pipeline {source!r} is not a text-to-image pipeline")
    loaded.conditioning = "prompt"
    loaded.num_classes = None
    loaded.encode_prompt = pipe.encode_prompt
    loaded.decoder = pipe.decoder
    loaded.config["pipeline"] = {"source": str(source), "fingerprint": pipe.identity()["fingerprint"]}
    loaded.info["teacher_pipeline"] = pipe
    return loaded
