"""EDM denoising-score-matching training (Karras et al. 2022), class-conditional with label dropout.

Per row: ``ln sigma ~ N(p_mean, p_std^2)``, ``n ~ N(0, I)``, ``x = x0 + sigma n``; the label is replaced by
the null label ``num_classes`` with probability ``label_dropout`` (so the same net is also the
unconditional model classifier-free guidance needs). The loss is

    L = mean_rows[ lambda(sigma) * mean_pixels (D(x, sigma, label) - x0)^2 ],
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2,

with ``D`` the EDM preconditioning (:class:`fastgen.core.denoiser.EDMDenoiser`) around the network.
(EDM sums over pixels; fastgen averages, which only rescales the loss; Adam is invariant to it.)
``lambda * (D - x0)^2 = (F - F_target)^2`` with the effective target
``F_target = (x0 - c_skip x) / c_out``, so the per-pixel loss is O(1) at every sigma.

The batch is ``{"x": (B, ...) data, "label": (B,) int64}`` (``label`` optional).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import EDMDenoiser
from fastgen.train.input_perturbation import check_ip, ip_noise, perturb_edm
from fastgen.train.method import SingleNetworkMethod, register_method

__all__ = ["EDMMethod", "edm_loss", "drop_labels"]


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def drop_labels(
    labels: torch.Tensor | None, p: float, null_label: int, generator: torch.Generator
) -> torch.Tensor | None:
    """Replace each label by ``null_label`` with probability ``p`` (draws on ``generator``'s device)."""
    if labels is None:
        return None
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=generator, device=generator.device).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def edm_loss(
    denoiser: EDMDenoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, **cond: Any
) -> torch.Tensor:
    """The EDM loss for given ``sigma (B,)`` and ``noise`` (shape of ``x0``): a scalar (see module doc)."""
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    d = denoiser(x0 + _bcast(sigma, x0) * noise, sigma, **cond)
    dt = torch.promote_types(x0.dtype, torch.float32)  # at least float32, float64 stays float64
    per_row = ((d.to(dt) - x0.to(dt)) ** 2).reshape(x0.shape[0], -1).mean(dim=1)
    return (weight.to(dt) * per_row).mean()


class EDMMethod(SingleNetworkMethod):
    """EDM teacher training for a net ``net(x_in, c_noise, class_labels=None, **scalars) -> F``.

    Args:
        net: the raw network (e.g. :func:`fastgen.models.nets.build_network`); wrapped in
            :class:`EDMDenoiser` with ``sigma_data``.
        sigma_data: data standard deviation used by the preconditioning (0.5 for images in [-1, 1]).
        p_mean, p_std: log-normal sigma distribution of training noise levels.
        label_dropout: probability of replacing a label by the null label ``num_classes``.
        num_classes: number of classes (defaults to ``net.num_classes``; 0 = unconditional, labels ignored).
        input_perturbation: DDPM-IP gamma (0 = off; 0.1 in the paper), see :mod:`fastgen.train.input_perturbation`.
        ip_target: ``"eps"`` (faithful DDPM-IP) or ``"x0"`` (noise-level relabelling).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        label_dropout: float = 0.1,
        num_classes: int | None = None,
        input_perturbation: float = 0.0,
        ip_target: str = "eps",
    ) -> None:
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        if p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        self.input_perturbation, self.ip_target = check_ip(input_perturbation, ip_target)
        self.net = net
        self.denoiser = EDMDenoiser(net, sigma_data=sigma_data)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.label_dropout = float(label_dropout)
        self.num_classes = int(getattr(net, "num_classes", 0) if num_classes is None else num_classes)
        self.last_logs: dict[str, float] = {}

    def sample_sigma(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training sigmas, log-normal, on ``generator``'s device."""
        z = torch.randn(n, generator=generator, device=generator.device)
        return (self.p_mean + self.p_std * z).exp()

    def step(
        self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> Mapping[str, torch.Tensor]:
        x0 = batch["x"]
        dev = x0.device
        sigma = self.sample_sigma(x0.shape[0], generator).to(dev)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(dev, x0.dtype)
        cond: dict[str, Any] = {}
        if self.num_classes:
            labels = batch.get("label")
            cond["class_labels"] = drop_labels(
                None if labels is None else labels.to(dev), self.label_dropout, self.num_classes, generator
            )
        if self.input_perturbation > 0:  # DDPM-IP: perturbed input, same target (separate random stream)
            x0, noise = perturb_edm(x0, noise, sigma, ip_noise(x0, self.input_perturbation, generator), self.ip_target)
        loss = edm_loss(self.denoiser, x0, sigma, noise, **cond)
        self.last_logs = {}
        return {"main": loss}

    def sampling_denoiser(self, net: nn.Module | None = None) -> EDMDenoiser:
        """An :class:`EDMDenoiser` around ``net`` (e.g. the EMA copy) or the training net."""
        return EDMDenoiser(net if net is not None else self.net, sigma_data=self.denoiser.sigma_data)


def from_config(cfg: Any) -> EDMMethod:
    """Factory for ``method: {name: edm, ...}``: builds ``cfg.network`` and the method's kwargs."""
    from fastgen.models.nets import build_network
    from fastgen.train.method import check_kwargs, method_kwargs

    kw = method_kwargs(cfg)
    check_kwargs(EDMMethod.__init__, kw, "edm method")
    net_kw = dict(cfg.network)
    return EDMMethod(build_network(net_kw.pop("kind"), **net_kw), **kw)


register_method("edm", from_config)
