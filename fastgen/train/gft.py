"""Guidance-free training (GFT; Chen et al., ICML 2025): one network whose single pass equals CFG.

Parameterisation (fastgen works in x0-space through the EDM preconditioning): one network
``D_theta(x, sigma, class_labels, beta)`` is

- the *sampling* model ``D^s(x | c, beta)`` (sample it at ``beta = 1/w``, one pass per step), and
- the *unconditional* model ``D^u(x) = D_theta(x, sigma, null, beta = 1)``.

The implied conditional model, which is what the data loss sees, is::

    D^c(x | c) = beta * D^s(x | c, beta) + (1 - beta) * sg[D^u(x)],      beta = 1/w in (0, 1]

At the optimum ``D^s = D^u + (1/beta) (D^c - D^u)`` -- exactly CFG at ``w = 1/beta``. Because x0-, epsilon-
and velocity-predictions are affine in one another at fixed ``(x, sigma)`` with coefficients summing to one,
this mixture in x0-space is the paper's epsilon-space mixture; the loss is the EDM loss of ``D^c``:

    L = mean_rows[ lambda(sigma) * mean_pixels (beta D^s + (1 - beta) sg[D^u] - x0)^2 ]

Per row: ``beta ~ U(beta_min, beta_max)`` (default U(0, 1)); the label is dropped to the null label
``num_classes`` with probability ``label_dropout`` and **dropped rows feed beta = 1 to the network** (the
mixture keeps the sampled beta, so such a row's prediction *value* is ``D_theta(x, null, 1)`` and its
gradient is scaled by beta, as in the official code). ``D^u`` is computed with no gradient and the network
in eval mode. The net must accept the scalar keyword ``beta`` (build it with ``scalars=("beta",)`` and
``scalar_defaults={"beta": 1.0}``); :func:`zero_init_beta` zero-initialises the beta embedding's output
layer so fine-tuning starts exactly at the pretrained model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import EDMDenoiser
from fastgen.train.method import SingleNetworkMethod, register_method

__all__ = ["GFTMethod", "from_config", "gft_mixture", "zero_init_beta"]


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def gft_mixture(d_s: torch.Tensor, d_u: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``beta * d_s + (1 - beta) * d_u.detach()`` with ``beta`` (B,) broadcast over the trailing dims."""
    b = _bcast(beta.to(d_s.dtype), d_s)
    return b * d_s + (1 - b) * d_u.detach()


def zero_init_beta(net: nn.Module, name: str = "beta") -> nn.Module:
    """Zero the output layer of the net's ``name`` scalar embedding (fastgen.models.nets layout:
    ``net.cond.scalar_embed[name].mlp[-1]``), so the beta input starts with no effect. Returns ``net``."""
    cond = getattr(net, "cond", None)
    emb = getattr(cond, "scalar_embed", None)
    if emb is None or name not in emb:
        raise ValueError(f"net has no scalar embedding {name!r}; build it with scalars=({name!r},)")
    last = emb[name].mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return net


class GFTMethod(SingleNetworkMethod):
    """GFT training of ``net(x_in, c_noise, class_labels=None, beta=None) -> F`` under EDM preconditioning.

    Args:
        net: raw network accepting ``class_labels`` (null = ``num_classes``) and the scalar ``beta``.
        num_classes: number of classes (default ``net.num_classes``); must be >= 1.
        sigma_data, p_mean, p_std: EDM preconditioning and log-normal training sigmas.
        label_dropout: probability of the null label, in [0, 1] (0.1 as in DiT).
        beta_min, beta_max: the beta range, ``0 <= beta_min < beta_max <= 1``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        label_dropout: float = 0.1,
        beta_min: float = 0.0,
        beta_max: float = 1.0,
    ) -> None:
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        if not 0 <= beta_min < beta_max <= 1:
            raise ValueError(f"need 0 <= beta_min < beta_max <= 1, got beta_min={beta_min}, beta_max={beta_max}")
        if p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        nc = int(getattr(net, "num_classes", 0) if num_classes is None else num_classes)
        if nc < 1:
            raise ValueError(f"num_classes must be >= 1 (GFT needs a conditional model), got {nc}")
        self.net = net
        self.denoiser = EDMDenoiser(net, sigma_data=sigma_data)
        self.num_classes = nc
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.label_dropout = float(label_dropout)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.last_logs: dict[str, float] = {}

    # -- pieces ------------------------------------------------------------------------------
    def sample_inputs(
        self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Draw ``sigma, noise, beta, dropped, labels_in, beta_in`` for a batch (on ``x0``'s device)."""
        dev, gdev, b = x0.device, generator.device, x0.shape[0]
        sigma = (self.p_mean + self.p_std * torch.randn(b, generator=generator, device=gdev)).exp().to(dev)
        noise = torch.randn(x0.shape, generator=generator, device=gdev).to(dev, x0.dtype)
        u = torch.rand(b, generator=generator, device=gdev).to(dev)
        beta = self.beta_min + (self.beta_max - self.beta_min) * u
        dropped = torch.rand(b, generator=generator, device=gdev).to(dev) < self.label_dropout
        labels = labels.to(dev).long()
        labels_in = torch.where(dropped, torch.full_like(labels, self.num_classes), labels)
        beta_in = torch.where(dropped, torch.ones_like(beta), beta)
        return {"sigma": sigma, "noise": noise, "beta": beta, "dropped": dropped,
                "labels_in": labels_in, "beta_in": beta_in}

    def unconditional(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``D^u(x) = D(x, sigma, null, beta = 1)``: no gradient, network in eval mode (mode restored)."""
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                null = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
                ones = torch.ones(x.shape[0], device=x.device)
                return self.denoiser(x, sigma, class_labels=null, beta=ones).detach()
        finally:
            self.net.train(was_training)

    def loss(self, x0: torch.Tensor, inp: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The GFT loss (module docstring) for drawn inputs ``inp`` (see :meth:`sample_inputs`)."""
        sigma = inp["sigma"]
        x = x0 + _bcast(sigma, x0) * inp["noise"]
        d_u = self.unconditional(x, sigma)
        d_s = self.denoiser(x, sigma, class_labels=inp["labels_in"], beta=inp["beta_in"])
        d_c = gft_mixture(d_s, d_u, inp["beta"])
        sd = self.denoiser.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        per_row = ((d_c.float() - x0.float()) ** 2).reshape(x0.shape[0], -1).mean(1)
        with torch.no_grad():
            self.last_logs = {
                "loss_u": float((weight * ((d_u.float() - x0.float()) ** 2).reshape(x0.shape[0], -1).mean(1)).mean()),
                "loss_s": float((weight * ((d_s.float() - x0.float()) ** 2).reshape(x0.shape[0], -1).mean(1)).mean()),
            }
        return (weight.float() * per_row).mean()

    def step(
        self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> Mapping[str, torch.Tensor]:
        x0 = batch["x"]
        labels = batch.get("label")
        if labels is None:
            raise ValueError("batch must contain 'label' for GFT (a class-conditional method)")
        return {"main": self.loss(x0, self.sample_inputs(x0, labels, generator))}

    def sampling_denoiser(self, net: nn.Module | None = None) -> EDMDenoiser:
        """An :class:`EDMDenoiser` around ``net`` (e.g. the EMA copy); wrap it in
        :func:`fastgen.samplers.guidance.gft` to sample at ``beta = 1/w``."""
        return EDMDenoiser(net if net is not None else self.net, sigma_data=self.denoiser.sigma_data)


def from_config(cfg: Any) -> GFTMethod:
    """Factory for ``method: {name: gft, init: ..., ...GFTMethod kwargs}``.

    ``cfg.network`` must declare the scalar ``beta`` (``scalars: [beta]``, ``scalar_defaults: {beta: 1.0}``).
    ``init`` (optional) fine-tunes from a pretrained model: a :func:`fastgen.models.load_model` source (a zoo
    name such as ``digits-edm``, a training run or checkpoint) or a ``.safetensors``
    path whose keys fit the network minus the beta embedding; the beta embedding's output layer is then
    zero-initialised so step 0 is exactly the pretrained model.
    """
    from pathlib import Path

    from fastgen.models.nets import build_network
    from fastgen.train.method import check_kwargs, method_kwargs

    kw = method_kwargs(cfg)
    init = kw.pop("init", None)
    check_kwargs(GFTMethod.__init__, kw, "gft method")
    net_kw = dict(cfg.network)
    if "beta" not in tuple(net_kw.get("scalars", ())):
        raise ValueError(f"network.scalars must include 'beta' for GFT, got {net_kw.get('scalars')}")
    net = build_network(net_kw.pop("kind"), **net_kw)
    if init:
        if str(init).endswith(".safetensors") or Path(str(init)).is_file():
            from safetensors.torch import load_file

            state = load_file(str(init))
        else:  # any load_model source with an EDM-wrapped network: a zoo name, a training run or checkpoint
            from fastgen.models import load_model

            src = load_model(str(init))
            inner = getattr(src.denoiser, "net", None)
            if inner is None:
                raise ValueError(f"init {init!r} is a {src.kind} model without an EDM network to start from")
            state = inner.state_dict()
        missing, unexpected = net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        bad = [k for k in missing if not k.startswith("cond.scalar_embed.beta")]
        if bad or unexpected:
            raise ValueError(f"init {init!r} does not fit the network: missing {bad}, unexpected {list(unexpected)}")
        zero_init_beta(net)
    return GFTMethod(net, **kw)


register_method("gft", from_config)
