"""f-distill: a one-step student trained by f-divergence distribution matching (DMD2 = reverse-KL).

Networks (see :class:`FDistill`):

- ``teacher`` -- a frozen denoiser ``D(x, sigma, **cond)`` (optionally CFG-guided);
- ``student`` -- a :class:`~fastgen.distill.student.OneStepStudent` ``G(z, cond)``, by default a copy
  of the teacher evaluated once at ``sigma_max``: ``x = D_copy(sigma_max z, sigma_max)``;
- ``fake_score`` -- a trainable denoiser of the student's distribution (by default a teacher copy);
- ``disc`` -- discriminator head(s) whose logit estimates ``log r``, ``r = p_teacher / q_student``.

Generator step (f-distill card, sections 1, 4, 5), for ``x = G(z)``, ``x_t = x + sigma eps``::

    r   = clip(exp(clamp(mean_heads logit(x_t), -10, 10)), 0.1, 20)          (detached)
    r~  = r / bin_mean(log sigma)          h~ = h(r~) / mean_shard h(r~)      (detached; see ratio.py)
    g   = h~ * ((x - D_T) - (x - D_fake)) / (mean |x - D_T| + eps)          (DMD2's normalised gradient)
    L_G = 1/2 mean((x - sg(x - g))^2) + lambda_gan * mean softplus(-logit(x_t))
          [+ lambda_reg * mean((x - ODE_T(sigma_max z))^2)]                        (optional, DMD's regression)

so ``dL/dx = g / numel``. With ``h = 1`` (reverse-KL) this is DMD2's generator loss bit for bit. The
regression term (``regression_weight``, default 0) is DMD's (v1) paired loss with MSE for LPIPS: the teacher's
ODE from the student's own noise, solved online on each student step.

Critic step (section 6): denoising score matching of ``fake_score`` on stop-gradient student samples
(x0-MSE, optionally EDM-weighted) plus ``disc_weight`` times the logistic loss
``softplus(logit(fake x_t)) + softplus(-logit(real x_t'))`` (real data noised at an independent
sigma), plus an optional approximate R1 term.

Schedule: the student is updated every ``student_every``-th step; the critics every step
(``critic_on_student_steps=True``, DMD2) or only on the other steps (False, FastGen).
Sigmas are drawn uniformly from indices ``[t_index_lo, t_index_hi]`` of a ``t_grid``-point Karras
(rho = 7) grid on ``[sigma_min, sigma_max]`` (DMD2: 2...998 of 1000).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.core.schedules import karras
from fastgen.core.solvers import get_solver
from fastgen.distill import divergences
from fastgen.distill.discriminator import FeatureTap
from fastgen.distill.fconfig import FAKE_WEIGHTINGS, PLACEMENTS, FDistillConfig
from fastgen.distill.losses import dmd_gradient, pseudo_target_loss
from fastgen.distill.placement import get_placement
from fastgen.distill.ratio import RatioBins, discriminator_loss, logit_to_ratio, normalise_h
from fastgen.distill.student import OneStepStudent
from fastgen.samplers.guidance import guidance_combine


def _check_finite(name: str, t: torch.Tensor, step: int) -> None:
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"f-distill: {name} is not finite at step {step}")


def _trainable(net: nn.Module, name: str) -> nn.Module:
    if not any(True for _ in net.parameters()):
        raise ValueError(
            f"{name} has no parameters (is the teacher an exact/analytic denoiser?); pass a trainable {name}="
        )
    return net.requires_grad_(True)


class FDistill:
    """The f-distill method (implements :class:`fastgen.train.method.Method`).

    Args:
        teacher: frozen denoiser ``D(x, sigma, **cond)`` (an ``nn.Module``; set to eval, no grad).
        config: :class:`FDistillConfig` (or a mapping for :meth:`FDistillConfig.from_dict`).
        student: a :class:`OneStepStudent` (or a generator module ``net(z, **cond)``); default: a copy of
            the teacher evaluated at ``student_sigma`` (``OneStepStudent(copy(teacher), sigma_max)``).
        fake_score: trainable denoiser; default: a copy of the teacher.
        discriminator: optional prebuilt head module (else built from ``placement``/``feature_layers``).

    At construction the student, teacher and fake score are probed on a batch of 2 (with class
    labels 0 when ``class_conditional``) and shape mismatches, missing feature layers or untrainable
    nets raise ``ValueError``.

    Networks: ``student`` (EMA'd), ``fake_score``, ``disc``; optimizers ``student`` and ``critic``
    (fake score + heads); frozen: ``teacher``. Batches are ``{data_key: x (B, *sample_shape),
    [label_key: labels (B,)]}``; labels are passed as ``class_labels=``.
    """

    #: FSDP2 (torch 2.13) frees a sharded network's gathered parameters after its first backward, and
    #: f-distill runs its fake score and heads several times per backward (fake and real samples, R1):
    #: the trainer refuses FSDP for it (DDP is exact). Measured on CPU/gloo: "setStorage: ... out of
    #: bounds for storage of size 0" in the critic's backward.
    fsdp_supported = False

    def __init__(
        self,
        teacher: nn.Module,
        config: FDistillConfig | Mapping[str, Any],
        student: nn.Module | None = None,
        fake_score: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        class_conditional: bool = False,
    ) -> None:
        cfg = config if isinstance(config, FDistillConfig) else FDistillConfig.from_dict(config)
        self.config = cfg
        self.div = divergences.get(cfg.divergence)
        self.class_conditional = bool(class_conditional)
        s_sigma = cfg.student_sigma if cfg.student_sigma is not None else cfg.sigma_max
        # Copies first: hooks registered on the teacher below must not be copied into them.
        if student is None:
            student = OneStepStudent(_trainable(copy.deepcopy(teacher), "student"), sigma=s_sigma)
        elif not isinstance(student, OneStepStudent):
            student = OneStepStudent(student, sigma=None)
        if fake_score is None:
            fake_score = copy.deepcopy(teacher)
        self.student = _trainable(student, "student")
        self.fake_score = _trainable(fake_score, "fake_score")
        self.teacher = teacher.eval().requires_grad_(False)
        self.bins = RatioBins(cfg.sigma_min, cfg.sigma_max, cfg.ratio_bins, cfg.ratio_rho, space=cfg.ratio_bin_space)
        grid = karras(cfg.t_grid, cfg.sigma_min, cfg.sigma_max)[:-1].flip(0).double()  # ascending
        self.t_sigmas = grid[cfg.t_index_lo : cfg.t_index_hi + 1].float()
        self.last_logs: dict[str, float] = {}
        self.tap: FeatureTap | None = None
        self.placement = get_placement(cfg.placement)
        self._probe_and_build(discriminator)

    # ------------------------------------------------------------------ Method protocol
    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "fake_score": self.fake_score, "disc": self.disc}

    def optimizer_groups(self) -> dict[str, list[str]]:
        return {"student": ["student"], "critic": ["fake_score", "disc"]}

    def ema_networks(self) -> list[str]:
        return ["student"]

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def end_step(self) -> None:
        """Called by the trainer on every process after all micro-batches of an optimizer step: the
        ratio bins take the step's statistics (summed over shards and processes)."""
        self.bins.commit()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Non-network state for exact resume: the ratio-bin means (pending statistics applied)."""
        if getattr(self.bins, "pending", None) is not None:
            self.bins.commit()
        return {"ratio_bins": self.bins.means.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "ratio_bins" not in state:
            raise ValueError("f-distill state must contain 'ratio_bins'")
        bins = torch.as_tensor(state["ratio_bins"], dtype=torch.float32)
        if bins.shape != self.bins.means.shape:
            raise ValueError(
                f"ratio_bins has shape {tuple(bins.shape)}, expected {tuple(self.bins.means.shape)}"
            )
        self.bins.means.copy_(bins)
        self.bins.pending = None

    def to(self, device: str | torch.device) -> FDistill:
        """Move every network and the ratio bins to ``device`` (the trainer does this itself)."""
        for net in (*self.networks().values(), self.teacher):
            net.to(device)
        self.bins.to(device)
        return self

    # ------------------------------------------------------------------ start-up checks
    def _probe_and_build(self, discriminator: nn.Module | None) -> None:
        cfg = self.config
        dev = next((p.device for p in self.student.parameters()), torch.device("cpu"))
        z = torch.randn((2, *cfg.sample_shape), generator=torch.Generator().manual_seed(0)).to(dev)
        cond = self._cond(torch.zeros(2, dtype=torch.long, device=dev)) if self.class_conditional else {}
        sigma = torch.full((2,), float(self.t_sigmas[len(self.t_sigmas) // 2]), device=dev)
        with torch.no_grad():
            x = self._call("student", lambda: self.student(z, cond), z.shape)
            xt = x + sigma.reshape(-1, *([1] * (x.ndim - 1))) * z
            self._call("teacher", lambda: self.teacher(xt, sigma, **cond), z.shape)
            self._call("fake_score", lambda: self.fake_score(xt, sigma, **cond), z.shape)
        if discriminator is not None:
            self.tap, self.disc = self.placement.build(self, xt, sigma, cond, discriminator)
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.tap, self.disc = self.placement.build(self, xt, sigma, cond)
        self.disc.to(dev)

    def _call(self, name: str, fn: Any, shape: torch.Size) -> torch.Tensor:
        try:
            out = fn()
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise ValueError(
                f"{name} failed on a probe batch of shape {tuple(shape)} "
                f"(sample_shape={self.config.sample_shape}): {err}"
            ) from err
        if not isinstance(out, torch.Tensor) or out.shape != shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{name} returned shape {got} for samples of shape {tuple(shape)}; student, teacher and fake "
                "score must all map (B, *sample_shape) to (B, *sample_shape) with "
                f"sample_shape={self.config.sample_shape}"
            )
        return out

    # ------------------------------------------------------------------ pieces
    def _cond(self, labels: torch.Tensor | None) -> dict[str, Any]:
        return {"class_labels": labels} if labels is not None else {}

    def sample_sigma(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """``n`` sigmas drawn uniformly from the configured Karras-grid indices."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(0, len(self.t_sigmas), (n,), generator=generator, device=gdev)
        return self.t_sigmas.to(gdev)[idx].to(device)

    def teacher_predict(
        self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]
    ) -> torch.Tensor:
        """The (CFG-guided when ``guidance_scale != 1``) teacher prediction, detached."""
        with torch.no_grad():
            return self._guide(self.teacher(x_t, sigma, **cond), x_t, sigma, cond)

    def regression_loss(self, x: torch.Tensor, z: torch.Tensor, cond: Mapping[str, Any], step: int,
                        logs: dict[str, float]) -> torch.Tensor:
        """``w_reg(step) * mean((x - ODE_T(sigma_max z))^2)`` for the student's samples ``x = G(z)`` (a zero when
        the weight is 0 at ``step``: no teacher ODE is solved); logs ``loss_regression`` and its weight."""
        w_reg = self.regression_weight_at(step)
        if w_reg <= 0:
            return x.new_zeros((), dtype=torch.float32)
        loss_reg = ((x.float() - self.teacher_ode(z, cond).float()) ** 2).mean()
        logs["loss_regression"] = float(loss_reg.detach())
        logs["regression_weight"] = w_reg
        return w_reg * loss_reg

    def regression_weight_at(self, step: int) -> float:
        """``regression_weight`` at ``step``: constant, or decayed linearly to 0 at ``regression_anneal_steps``."""
        cfg = self.config
        if cfg.regression_anneal_steps == 0:
            return cfg.regression_weight
        return cfg.regression_weight * max(0.0, 1.0 - step / cfg.regression_anneal_steps)

    def teacher_ode(self, z: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """The (guided) teacher's probability-flow ODE solution from ``sigma_max z`` to sigma = 0 (detached;
        ``regression_solver`` on ``regression_grid`` Karras sigmas): the regression target of noise ``z``."""
        cfg = self.config
        sigmas = karras(cfg.regression_grid, cfg.sigma_min, cfg.sigma_max).to(z.device)
        with torch.no_grad():
            return get_solver(cfg.regression_solver)(
                lambda x, s, **c: self.teacher_predict(x, s, c), z.detach() * cfg.sigma_max, sigmas, **dict(cond))

    def _guide(
        self, d: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]
    ) -> torch.Tensor:
        w = self.config.guidance_scale
        d = d.detach()
        if w == 1.0:
            return d
        uncond = {k: v for k, v in cond.items() if k != "class_labels"}
        if self.config.null_label is not None and "class_labels" in cond:
            uncond["class_labels"] = torch.full_like(cond["class_labels"], self.config.null_label)
        with torch.no_grad():
            d_u = self.teacher(x_t, sigma, **uncond)
        return guidance_combine(d, d_u, w)

    def _bcast(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)

    # ------------------------------------------------------------------ losses
    def _generator_terms(
        self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any], step: int,
        logits: torch.Tensor | None, d_teacher: torch.Tensor | None, d_fake: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """The generator loss's detached pieces at the noised student sample ``x_t``.

        Returns ``(d_teacher, d_fake, r_t, h, logs)``: the (guided) teacher's and the fake score's x0
        predictions (the ones ``placement.student_logits`` already computed are reused), the bin-normalised
        density ratio ``r_t`` (B,) from the discriminator ``logits`` and ``h = normalise_h(div.h(r_t))``
        (both ones when the divergence needs no ratio), and their log statistics.
        """
        cfg = self.config
        with torch.no_grad():
            xd = x_t.detach()
            d_teacher = (
                self.teacher_predict(xd, sigma, cond)
                if d_teacher is None
                else self._guide(d_teacher, xd, sigma, cond)
            )
            d_fake = self.fake_score(xd, sigma, **cond) if d_fake is None else d_fake.detach()
        _check_finite("teacher prediction", d_teacher, step)
        _check_finite("fake-score prediction", d_fake, step)
        logs: dict[str, float] = {}
        if self.div.need_r:
            assert logits is not None
            r = logit_to_ratio(logits, cfg.logit_clamp, cfg.ratio_clip)
            r_t = self.bins.shard_normalise(r, sigma)
            h = normalise_h(self.div.h(r_t))
            logs.update(_stats("r", r))
            logs.update(_stats("r_norm", r_t))
        else:
            r_t = torch.ones(x_t.shape[0], device=x_t.device)
            h = torch.ones(x_t.shape[0], device=x_t.device)
        logs.update(_stats("h", h))
        return d_teacher, d_fake, r_t, h, logs

    def student_loss(
        self, z: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, cond: Mapping[str, Any], step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator loss for noise ``z``, diffusion sigmas ``sigma`` (B,) and noise ``eps``.

        Returns ``(loss, x)`` where ``x = student(z, cond)`` (with its graph). Fills ``self.last_logs``.
        """
        cfg = self.config
        x = self.student(z, dict(cond))
        _check_finite("student sample", x.detach(), step)
        x_t = x + self._bcast(sigma, x) * eps
        use_gan = cfg.lambda_gan > 0
        need_r = self.div.need_r
        d_fake: torch.Tensor | None = None
        d_teacher: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        if use_gan or need_r:
            with torch.set_grad_enabled(use_gan):
                src = x_t if use_gan else x_t.detach()
                logits, d_teacher, d_fake = self.placement.student_logits(self, src, sigma, cond)
        d_teacher, d_fake, _, h, logs = self._generator_terms(x_t, sigma, cond, step, logits, d_teacher, d_fake)
        g = dmd_gradient(x, d_teacher, d_fake, h, cfg.dmd_eps)
        loss_dmd = pseudo_target_loss(x, g)
        loss = loss_dmd
        logs["loss_dmd"] = float(loss_dmd.detach())
        logs["grad_x_dmd"] = float(g.norm() / g.numel())
        loss = loss + self.regression_loss(x, z, cond, step, logs)
        if use_gan:
            assert logits is not None
            loss_gan = F.softplus(-logits).mean()
            loss = loss + cfg.lambda_gan * loss_gan
            logs["loss_gan_g"] = float(loss_gan.detach())
            if x.requires_grad:
                (gx,) = torch.autograd.grad(cfg.lambda_gan * loss_gan, x, retain_graph=True)
                logs["grad_x_gan"] = float(gx.norm())
        _check_finite("student loss", loss, step)
        logs["loss_student"] = float(loss.detach())
        self.last_logs.update(logs)
        return loss, x

    def critic_loss(
        self,
        x_fake: torch.Tensor,
        sigma: torch.Tensor,
        eps: torch.Tensor,
        x_real: torch.Tensor,
        sigma_real: torch.Tensor,
        eps_real: torch.Tensor,
        cond: Mapping[str, Any],
        r1_noise: torch.Tensor | None = None,
        step: int = 0,
    ) -> torch.Tensor:
        """Fake-score DSM loss on stop-gradient student samples plus the discriminator's loss."""
        cfg = self.config
        x_fake = x_fake.detach()
        x_t = x_fake + self._bcast(sigma, x_fake) * eps
        xr_t = x_real + self._bcast(sigma_real, x_real) * eps_real
        logit_fake, d_fake = self.placement.critic_logits(self, x_t, sigma, cond)
        logit_real, _ = self.placement.critic_logits(self, xr_t, sigma_real, cond)
        if d_fake is None:
            d_fake = self.fake_score(x_t, sigma, **cond)
        err = ((d_fake.float() - x_fake.float()) ** 2).mean(dim=tuple(range(1, x_fake.ndim)))
        if cfg.fake_score_weighting == "edm":
            s = sigma.float()
            err = err * (1 / s**2 + 1 / cfg.sigma_data**2)
        loss_fake = err.mean()
        loss_d = discriminator_loss(logit_real, logit_fake)
        loss = loss_fake + cfg.disc_weight * loss_d
        logs = {
            "loss_fake_score": float(loss_fake.detach()),
            "loss_disc": float(loss_d.detach()),
            "logit_real": float(logit_real.mean().detach()),
            "logit_fake": float(logit_fake.mean().detach()),
        }
        if cfg.r1_weight > 0 and r1_noise is not None:
            xr_p = xr_t + cfg.r1_noise * r1_noise
            lp, _ = self.placement.critic_logits(self, xr_p, sigma_real, cond)
            r1 = ((logit_real - lp) ** 2).mean()
            loss = loss + cfg.disc_weight * cfg.r1_weight * r1
            logs["loss_r1"] = float(r1.detach())
        _check_finite("fake-score loss", loss_fake, step)
        _check_finite("discriminator loss", loss_d, step)
        logs["loss_critic"] = float(loss.detach())
        self.last_logs.update(logs)
        return loss

    def step(
        self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One iteration: ``{"student": L_G}`` every ``student_every``-th step, ``{"critic": L_C}``
        on the other steps (and on student steps too when ``critic_on_student_steps``)."""
        cfg = self.config
        if cfg.data_key not in batch:
            raise ValueError(f"batch has no {cfg.data_key!r} (data_key); keys: {sorted(batch)}")
        x_real = batch[cfg.data_key]
        if tuple(x_real.shape[1:]) != cfg.sample_shape:
            raise ValueError(
                f"batch[{cfg.data_key!r}] has sample shape {tuple(x_real.shape[1:])}, "
                f"config sample_shape is {cfg.sample_shape}"
            )
        labels = batch.get(cfg.label_key) if self.class_conditional else None
        if self.class_conditional and labels is None:
            raise ValueError(f"class_conditional f-distill needs batch[{cfg.label_key!r}] (label_key)")
        cond = self._cond(labels)
        n, dev = x_real.shape[0], x_real.device
        gdev = generator.device

        def randn() -> torch.Tensor:
            return torch.randn(x_real.shape, generator=generator, device=gdev).to(dev, x_real.dtype)

        if getattr(self.bins, "pending", None) is not None and step != getattr(self, "_pending_step", step):
            self.bins.commit()  # used without the trainer: the previous step ends when a new one starts
        self._pending_step = step
        self.last_logs = {}
        out: dict[str, torch.Tensor] = {}
        z = randn()
        student_step = step % cfg.student_every == 0
        x_fake: torch.Tensor | None = None
        if student_step:
            sigma, eps = self.sample_sigma(n, generator, dev), randn()
            out["student"], x = self.student_loss(z, sigma, eps, cond, step)
            x_fake = x.detach()
        if not student_step or cfg.critic_on_student_steps:
            if x_fake is None:
                with torch.no_grad():
                    x_fake = self.student(z, dict(cond))
            sigma, eps = self.sample_sigma(n, generator, dev), randn()
            sigma_r, eps_r = self.sample_sigma(n, generator, dev), randn()
            r1n = randn() if cfg.r1_weight > 0 else None
            out["critic"] = self.critic_loss(x_fake, sigma, eps, x_real, sigma_r, eps_r, cond, r1n, step)
        return out

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` student samples (B, *sample_shape) from noise drawn with ``generator``."""
        dev = next((p.device for p in self.student.parameters()), torch.device("cpu"))
        z = torch.randn((n, *self.config.sample_shape), generator=generator, device=generator.device).to(dev)
        return self.student(z, self._cond(labels))


def _stats(name: str, t: torch.Tensor) -> dict[str, float]:
    t = t.detach().float()
    return {f"{name}_min": float(t.min()), f"{name}_mean": float(t.mean()), f"{name}_max": float(t.max())}


__all__ = ["FDistill", "FDistillConfig", "dmd_gradient", "pseudo_target_loss", "PLACEMENTS", "FAKE_WEIGHTINGS"]
