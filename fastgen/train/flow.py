"""Flow matching (rectified flow / conditional OT path), class-conditional with label dropout.

Convention (the shortcut card's): ``t = 0`` is noise ``x0 ~ N(0, I)``, ``t = 1`` is data ``x1``;
``x_t = (1 - t) x0 + t x1``; the net predicts the velocity ``v = x1 - x0`` from ``(x_t, t, label)``:

    L = mean_rows mean_pixels (net(x_t, t, label) - (x1 - x0))^2,     t ~ U(0, 1) or logit-normal.

In the VE sigma-space of fastgen's core, ``sigma = (1 - t)/t`` and ``x = x_t / t``; a trained flow net
becomes an EDM-contract denoiser with :class:`fastgen.core.denoiser.RectifiedFlowDenoiser`:
``D(x, sigma) = E[x1 | x_t] = x_t + (1 - t) v(x_t, t)`` with ``t = 1/(1 + sigma)``, ``x_t = t x``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import RectifiedFlowDenoiser
from fastgen.train.edm import drop_labels
from fastgen.train.input_perturbation import check_ip, ip_noise, perturb_flow
from fastgen.train.method import SingleNetworkMethod, register_method

__all__ = ["FlowMatchingMethod", "flow_matching_loss"]

T_SAMPLINGS = ("uniform", "logit_normal")


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def flow_matching_loss(
    net: nn.Module, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, **cond: Any
) -> torch.Tensor:
    """Scalar flow-matching loss for data ``x1``, noise ``x0`` (same shape) and ``t (B,)`` in [0, 1]."""
    xt = (1 - _bcast(t, x1)) * x0 + _bcast(t, x1) * x1
    v = net(xt, t, **cond)
    dt = torch.promote_types(x1.dtype, torch.float32)
    return ((v.to(dt) - (x1 - x0).to(dt)) ** 2).reshape(x1.shape[0], -1).mean(dim=1).mean()


class FlowMatchingMethod(SingleNetworkMethod):
    """Flow-matching training of ``net(x_t, t, class_labels=None, **scalars) -> v``.

    Args:
        net: the velocity network.
        t_sampling: ``"uniform"`` (t ~ U(0, 1)) or ``"logit_normal"`` (t = sigmoid(N(t_mean, t_std^2))).
        t_mean, t_std: logit-normal parameters.
        label_dropout: probability of the null label ``num_classes``.
        num_classes: defaults to ``net.num_classes`` (0 = unconditional).
        input_perturbation: DDPM-IP gamma (0 = off), see :mod:`fastgen.train.input_perturbation`.
        ip_target: ``"eps"`` (faithful: target ``x1 - x0`` with the unperturbed noise) or ``"x0"``.
    """

    def __init__(
        self,
        net: nn.Module,
        t_sampling: str = "uniform",
        t_mean: float = 0.0,
        t_std: float = 1.0,
        label_dropout: float = 0.1,
        num_classes: int | None = None,
        input_perturbation: float = 0.0,
        ip_target: str = "eps",
    ) -> None:
        self.input_perturbation, self.ip_target = check_ip(input_perturbation, ip_target)
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        self.net = net
        self.t_sampling = t_sampling
        self.t_mean = float(t_mean)
        self.t_std = float(t_std)
        self.label_dropout = float(label_dropout)
        self.num_classes = int(getattr(net, "num_classes", 0) if num_classes is None else num_classes)
        self.last_logs: dict[str, float] = {}

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training times in [0, 1] on ``generator``'s device."""
        if self.t_sampling == "uniform":
            return torch.rand(n, generator=generator, device=generator.device)
        z = torch.randn(n, generator=generator, device=generator.device)
        return torch.sigmoid(self.t_mean + self.t_std * z)

    def step(
        self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> Mapping[str, torch.Tensor]:
        x1 = batch["x"]
        dev = x1.device
        t = self.sample_t(x1.shape[0], generator).to(dev, x1.dtype)
        x0 = torch.randn(x1.shape, generator=generator, device=generator.device).to(dev, x1.dtype)
        cond: dict[str, Any] = {}
        if self.num_classes:
            labels = batch.get("label")
            cond["class_labels"] = drop_labels(
                None if labels is None else labels.to(dev), self.label_dropout, self.num_classes, generator
            )
        if self.input_perturbation > 0:  # DDPM-IP: perturbed input, same target (separate random stream)
            x1, x0 = perturb_flow(x1, x0, t, ip_noise(x0, self.input_perturbation, generator), self.ip_target)
        self.last_logs = {}
        return {"main": flow_matching_loss(self.net, x1, x0, t, **cond)}

    def sampling_denoiser(self, net: nn.Module | None = None) -> RectifiedFlowDenoiser:
        """The EDM-contract denoiser (rectified-flow adapter) of ``net`` (e.g. the EMA copy) or the training net."""
        return RectifiedFlowDenoiser(net if net is not None else self.net)


def from_config(cfg: Any) -> FlowMatchingMethod:
    """Factory for ``method: {name: flow, ...}``: builds ``cfg.network`` and the method's kwargs."""
    from fastgen.models.nets import build_network
    from fastgen.train.method import check_kwargs, method_kwargs

    kw = method_kwargs(cfg)
    check_kwargs(FlowMatchingMethod.__init__, kw, "flow method")
    net_kw = dict(cfg.network)
    return FlowMatchingMethod(build_network(net_kw.pop("kind"), **net_kw), **kw)


register_method("flow", from_config)
