"""Uni-Instruct: one-step distillation through the diffusion expansion of an f-divergence.

Uni-Instruct (Wang et al., NeurIPS 2025; card ``shared/methods/uni-instruct.md``) writes the data-space
f-divergence as ``D_f(p_0 || q_0) = int (g^2/2) E_{q_t}[Phi(r) ||y||^2] dt`` with ``r = p_t / q_t``
(teacher over student), ``y = grad log p_t - grad log q_t`` and ``Phi(r) = r^2 f''(r)`` (f-distill's
``h``). Per noise level, with every network frozen but evaluated at the differentiable
``x_t = x + sigma eps`` (VE, x0 units: ``y = (D_p - D_q) / sigma^2``, ``Delta = D_p - D_q``)::

    grad_theta E_q[Phi ||y||^2] = grad_theta E[ sg(a) ||y||^2 + sg(b) c + x_t . sg(omega y) ]
    a = Phi - r Phi',  b = 2 Phi,  c = Delta . (D_q - x) / sigma^4,  omega = 2 r Phi' c - r^2 Phi'' ||y||^2

(derived on the card and checked by ``tests/test_uni_instruct.py`` against the autograd of the
objective on a Gaussian toy). The first two pieces are the ratio-weighted SiD/SIM term (the networks'
*input* gradients flow), the last is a Diff-Instruct/DMD-type term with the scalar weight ``omega``.
Reverse-KL (``Phi = 1``) gives ``||y||^2 + 2c``, i.e. SiD with ``alpha = 0.5``.

:class:`UniInstruct` is :class:`~fastgen.distill.fdistill.FDistill` (same student, fake score,
discriminator, ratio ``r = exp(clamp(logit))`` with its clip, per-bin ratio normalisation, critic
step) with the generator loss::

    L_G = sim_weight * mean_i w_i [sg(a_i) ||Delta_i||^2 + sg(b_i) Delta_i . (D_q,i - x_i)]
          + di_weight * DI  +  lambda_gan * mean softplus(-logit(x_t))  [+ f-distill's regression term]

with per-sample weight ``w_i = 1 / (wf_i * numel_i * mean_batch Phi)`` (``wf = mean |x - D_p| + dmd_eps``,
SiD's normaliser; the sigma^4 of the expansion is absorbed into the per-sigma weighting) and DI either
``"exact"`` (the ``omega`` term above, same weights: the whole loss is then the expansion's gradient),
``"fdistill"`` (f-distill's ``h~``-weighted DMD term, bit for bit) or ``"none"``.
``sim_weight = 0`` with ``di_term = "fdistill"`` is f-distill exactly (tested bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fastgen.distill import divergences
from fastgen.distill.fconfig import FDistillConfig
from fastgen.distill.fdistill import FDistill, _check_finite
from fastgen.distill.losses import dmd_gradient, pseudo_target_loss
from fastgen.samplers.guidance import guidance_combine

__all__ = ["DI_TERMS", "UniInstructConfig", "UniInstruct", "phi_derivatives", "uni_instruct_terms", "from_config"]

DI_TERMS = ("exact", "fdistill", "none")


@dataclass(frozen=True)
class UniInstructConfig(FDistillConfig):
    """:class:`FDistillConfig` plus the Uni-Instruct generator-loss weights.

    Attributes:
        sim_weight: weight of the ratio-weighted SiD/SIM term (0 = off).
        di_term: ``"exact"`` (the expansion's omega-weighted DI term), ``"fdistill"`` (f-distill's
            ``h~``-weighted DMD term) or ``"none"``.
        di_weight: weight of the DI term.
    """

    sim_weight: float = 1.0
    di_term: str = "exact"
    di_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sim_weight", "di_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.di_term not in DI_TERMS:
            raise ValueError(f"di_term must be one of {DI_TERMS}, got {self.di_term!r}")


def phi_derivatives(div: divergences.Divergence, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(Phi, Phi', Phi'')`` of ``Phi = div.h`` at ``r`` (detached, ``r``'s dtype), by autograd."""
    rr = r.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        phi = div.h(rr)
        if not phi.requires_grad:  # constant Phi (reverse-KL)
            zero = torch.zeros_like(rr)
            return phi.detach(), zero, zero.clone()
        (d1,) = torch.autograd.grad(phi.sum(), rr, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), rr)[0] if d1.requires_grad else torch.zeros_like(rr)
    return phi.detach(), d1.detach(), d2.detach()


def uni_instruct_terms(
    x: torch.Tensor,
    d_teacher: torch.Tensor,
    d_fake: torch.Tensor,
    r: torch.Tensor,
    sigma: torch.Tensor,
    div: divergences.Divergence,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two pieces of the Uni-Instruct surrogate for one noise level (VE, x0 units).

    Args:
        x: generator samples (B, ...) with their graph.
        d_teacher, d_fake: ``D_p(x_t)``, ``D_q(x_t)`` (B, ...) at ``x_t = x + sigma eps``, with graphs
            through their *inputs* only (frozen parameters).
        r: detached density ratio ``p_t / q_t`` at ``x_t`` (B,).
        sigma: (B,) noise levels.

    Returns:
        ``(sim, g)``: ``sim`` (B,) = ``sg(a) ||Delta||^2 + sg(b) Delta . (D_q - x)`` (sums over features,
        with graph) and the detached DI direction ``g = omega_hat Delta / sigma^2`` (B, ...), with
        ``omega_hat = 2 r Phi' Delta.(D_q - x) - r^2 Phi'' ||Delta||^2`` (sigma^4 omega). Then
        ``sim_i + x_i . g_i`` has the gradient of ``sigma_i^4 E[Phi(r) ||y||^2]`` at one sample.
    """
    dims = tuple(range(1, x.ndim))
    shape = (-1, *([1] * (x.ndim - 1)))
    delta = d_teacher - d_fake
    cross = (delta * (d_fake - x)).sum(dims)
    sq = (delta**2).sum(dims)
    phi, d1, d2 = (t.to(x.dtype) for t in phi_derivatives(div, r))
    rr = r.detach().to(x.dtype)
    a, b = phi - rr * d1, 2 * phi
    sim = a * sq + b * cross
    with torch.no_grad():
        omega = 2 * rr * d1 * cross.detach() - rr**2 * d2 * sq.detach()
        g = (omega / sigma.to(x.dtype) ** 2).reshape(shape) * delta.detach()
    return sim, g


class UniInstruct(FDistill):
    """Uni-Instruct on the f-distill machinery (implements :class:`fastgen.train.method.Method`).

    Same constructor, networks, optimizers, critic step and state as :class:`FDistill`; ``config`` is a
    :class:`UniInstructConfig` (or a mapping). Only the generator loss differs (module docstring).
    The SIM term backpropagates through the teacher's and the fake score's inputs (about twice the
    generator-step memory of f-distill); the fake score's parameters get no gradient from it.
    """

    def __init__(self, teacher, config: UniInstructConfig | Mapping[str, Any], **kw: Any) -> None:
        cfg = config if isinstance(config, UniInstructConfig) else UniInstructConfig.from_dict(config)
        super().__init__(teacher, cfg, **kw)

    def _teacher_graph(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        d = self.teacher(x_t, sigma, **cond)
        if self.config.guidance_scale == 1.0:
            return d
        uncond = {k: v for k, v in cond.items() if k != "class_labels"}
        if self.config.null_label is not None and "class_labels" in cond:
            uncond["class_labels"] = torch.full_like(cond["class_labels"], self.config.null_label)
        return guidance_combine(d, self.teacher(x_t, sigma, **uncond), self.config.guidance_scale)

    def _fake_graph(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        params = [p for p in self.fake_score.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.fake_score(x_t, sigma, **cond)
        finally:
            for p in params:
                p.requires_grad_(True)

    def student_loss(
        self, z: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, cond: Mapping[str, Any], step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator loss (module docstring) for noise ``z``, sigmas ``sigma`` (B,) and noise ``eps``;
        returns ``(loss, x)`` and fills ``self.last_logs``."""
        cfg = self.config
        x = self.student(z, dict(cond))
        _check_finite("student sample", x.detach(), step)
        x_t = x + self._bcast(sigma, x) * eps
        use_gan, use_sim = cfg.lambda_gan > 0, cfg.sim_weight > 0
        need_r = self.div.need_r
        logits = d_teacher = d_fake = None
        if use_gan or need_r:
            with torch.set_grad_enabled(use_gan):
                src = x_t if use_gan else x_t.detach()
                logits, d_teacher, d_fake = self.placement.student_logits(self, src, sigma, cond)
        dp_g = dq_g = None
        if use_sim:
            dp_g = self._teacher_graph(x_t, sigma, cond)
            dq_g = self._fake_graph(x_t, sigma, cond)
        d_teacher, d_fake, r_t, h, logs = self._generator_terms(x_t, sigma, cond, step, logits, d_teacher, d_fake)
        loss = x.new_zeros((), dtype=torch.float32)
        if cfg.di_term == "fdistill" and cfg.di_weight > 0:
            g = dmd_gradient(x, d_teacher, d_fake, h, cfg.dmd_eps)
            loss_di = pseudo_target_loss(x, g)
            loss = loss_di if cfg.di_weight == 1.0 else cfg.di_weight * loss_di
            logs["loss_dmd"] = float(loss_di.detach())
        if use_sim or cfg.di_term == "exact":
            loss = loss + self._expansion_loss(x, dp_g, dq_g, d_teacher, d_fake, r_t, sigma, logs)
        if use_gan:
            assert logits is not None
            loss_gan = F.softplus(-logits).mean()
            loss = loss + cfg.lambda_gan * loss_gan
            logs["loss_gan_g"] = float(loss_gan.detach())
        loss = loss + self.regression_loss(x, z, cond, step, logs)  # DMD's paired term, as in f-distill
        _check_finite("student loss", loss, step)
        logs["loss_student"] = float(loss.detach())
        self.last_logs.update(logs)
        return loss, x

    def _expansion_loss(self, x, dp_g, dq_g, d_teacher, d_fake, r_t, sigma, logs) -> torch.Tensor:
        """``sim_weight * mean(w sim) + di_weight * [exact DI]`` with ``w = 1/(wf numel mean Phi)``."""
        cfg = self.config
        dims = tuple(range(1, x.ndim))
        numel = x[0].numel()
        with torch.no_grad():
            wf = (x.detach() - d_teacher).abs().mean(dims) + cfg.dmd_eps
            phi_mean = self.div.h(r_t).float().mean().clamp_min(1e-6)
            w = 1.0 / (wf * numel * phi_mean)
        dp = dp_g if dp_g is not None else d_teacher
        dq = dq_g if dq_g is not None else d_fake
        sim, g = uni_instruct_terms(x, dp, dq, r_t, sigma, self.div)
        out = x.new_zeros((), dtype=torch.float32)
        if cfg.sim_weight > 0:
            loss_sim = (w * sim).mean()
            out = out + cfg.sim_weight * loss_sim
            logs["loss_sim"] = float(loss_sim.detach())
        if cfg.di_term == "exact" and cfg.di_weight > 0:
            gw = (w * numel).reshape(-1, *([1] * (x.ndim - 1))) * g  # pseudo-target: grad = gw / (B numel)
            out = out + cfg.di_weight * pseudo_target_loss(x, gw)
            logs["grad_x_di"] = float(gw.norm() / gw.numel())
        return out


def from_config(cfg: Any) -> UniInstruct:
    """Build :class:`UniInstruct` from a training config whose ``method.name`` is ``uni_instruct``
    (the keys of :func:`fastgen.distill.build.from_config` plus ``sim_weight``, ``di_term``, ``di_weight``)."""
    from fastgen.distill.build import from_config as build

    return build(cfg, method_cls=UniInstruct, config_cls=UniInstructConfig)  # type: ignore[return-value]
