"""Sampling-side guidance as denoiser wrappers: CFG, ICG, TSG and GFT.

Every wrapper is itself a denoiser ``D(x, sigma, **cond) -> x0_hat`` (VE sigma, ``x = x0 + sigma eps``),
so it plugs into any fastgen solver or sampler. Guidance scales follow the DiT convention
``w = 1 + s``: ``w = 1`` is the plain conditional model (and is returned with a single pass, bitwise
equal to the wrapped denoiser), ``w > 1`` extrapolates away from the "weak" prediction::

    D_hat = D_weak + w * (D_strong - D_weak)

At fixed ``(x, sigma)`` the x0-, epsilon-, velocity- and score-predictions are affine images of one
another with coefficients that sum to one on the prediction, so this combination in x0-space equals the
same combination of epsilons, velocities or scores exactly.

- :class:`CFGDenoiser` / :func:`cfg` -- classifier-free guidance; weak = the unconditional pass
  (by default ``class_labels=None``; give ``uncond={"class_labels": null_tensor}`` for a null token).
  Two network calls per evaluation; with ``interval=(sigma_lo, sigma_hi)`` guidance is applied only
  there (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality in Diffusion Models") and other noise levels take the conditional pass alone.
- :class:`ICGDenoiser` / :func:`icg` -- independent condition guidance (Sadat et al. 2025); weak =
  the model under a condition drawn independently of ``x`` (a uniformly random class by default).
  It is **not** CFG for exact scores (see ``docs/shortcut_guidance.md``); two calls.
- :class:`TSGDenoiser` / :func:`tsg` -- time-step guidance; weak = the same conditional model with
  its time-step *embedding* perturbed, ``emb + scale * t**alpha * n``, ``n ~ N(0, I)``, via a forward
  hook on the embedding module, with ``t = sigma / (1 + sigma)`` in [0, 1) (1 = noise). Two calls.
- :class:`GFTDenoiser` / :func:`gft` -- a guidance-free-trained model sampled at ``beta = 1/w``:
  one network call per evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import sigma_batch

DenoiserFn = Callable[..., torch.Tensor]

#: Module names searched (as suffixes of ``named_modules()``) for the time-step embedding by TSG.
TIME_EMBEDDING_NAMES = ("time_embedding", "time_embed", "t_embedder", "t_embed", "time_mlp")


def _check_w(w: float, name: str = "w") -> float:
    w = float(w)
    if not (w == w) or w in (float("inf"), float("-inf")) or w < 0:
        raise ValueError(f"{name} must be a finite guidance scale >= 0 (DiT convention, 1 = no guidance), got {w}")
    return w


def guidance_combine(strong: torch.Tensor, weak: torch.Tensor, w: float) -> torch.Tensor:
    """``weak + w * (strong - weak)``: the one guidance formula (CFG, ICG, TSG here; f-distill's CFG teacher;
    shortcut training's bootstrap CFG). ``w = 1`` is ``strong`` up to rounding; ``w = 0`` is ``weak``."""
    return weak + w * (strong - weak)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance ``D_u + w (D_c - D_u)`` around a conditional denoiser.

    Args:
        denoiser: ``D(x, sigma, **cond)``; must accept the unconditional keywords of ``uncond``.
        w: guidance scale >= 0 (DiT convention; 1 = conditional model, one pass).
        uncond: keyword overrides for the unconditional pass, merged over the caller's ``cond``.
            Default ``{"class_labels": None}`` (fastgen's unconditional convention). A tensor value
            of shape () or with a leading batch dimension of 1 is expanded to the batch (e.g. a null
            class index, or the embeddings of one negative prompt for every sample).
        interval: ``(sigma_lo, sigma_hi)`` in VE sigma, ``0 <= sigma_lo < sigma_hi`` (``inf`` allowed):
            guide only where ``sigma_lo <= sigma <= sigma_hi``; elsewhere return the conditional
            prediction (one pass when no sample of the batch is inside). ``None`` (default): every sigma.
            Guidance at high noise narrows the samples' diversity; the paper keeps it to the middle.
    """

    def __init__(self, denoiser: DenoiserFn, w: float, uncond: Mapping[str, Any] | None = None,
                 interval: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.w = _check_w(w)
        self.uncond = dict(uncond) if uncond is not None else {"class_labels": None}
        self.interval = check_interval(interval)

    def _uncond_kwargs(self, x: torch.Tensor, cond: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(cond)
        for k, v in self.uncond.items():
            if isinstance(v, torch.Tensor) and v.ndim == 0:
                v = v.to(x.device).expand(x.shape[0])
            elif isinstance(v, torch.Tensor) and v.shape[0] == 1 and x.shape[0] != 1:
                v = v.to(x.device).expand(x.shape[0], *v.shape[1:])
            out[k] = v
        return out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        d_c = self.denoiser(x, sigma, **cond)
        if self.w == 1.0:
            return d_c
        inside = None
        if self.interval is not None:
            s = sigma_batch(sigma, x)
            inside = (s >= self.interval[0]) & (s <= self.interval[1])
            if not bool(inside.any()):
                return d_c
        d_u = self.denoiser(x, sigma, **self._uncond_kwargs(x, cond))
        guided = guidance_combine(d_c, d_u, self.w)
        if inside is None or bool(inside.all()):
            return guided
        return torch.where(inside.reshape(-1, *([1] * (x.ndim - 1))), guided, d_c)


#: ``--guidance-interval`` help of every command that takes it (``fastgen sample``, ``fastgen schedule``).
GUIDANCE_INTERVAL_HELP = ("CFG only for sigma in [LO, HI] (VE sigma; HI may be inf; Kynkaanniemi et al. 2024), the "
                          "conditional model elsewhere; needs --guidance != 1")


def check_interval(interval: tuple[float, float] | None, name: str = "interval") -> tuple[float, float] | None:
    """``None`` or a validated ``(sigma_lo, sigma_hi)`` with ``0 <= sigma_lo < sigma_hi`` (``sigma_hi`` may be inf)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be two sigmas (sigma_lo, sigma_hi), got {interval!r}") from err
    if not 0.0 <= lo < hi:  # also refuses NaN
        raise ValueError(f"{name} must satisfy 0 <= sigma_lo < sigma_hi (VE sigma), got ({lo}, {hi})")
    return lo, hi


def cfg(denoiser: DenoiserFn, w: float, uncond: Mapping[str, Any] | None = None,
        interval: tuple[float, float] | None = None) -> CFGDenoiser:
    """Classifier-free guidance at scale ``w`` (optionally only for sigma in ``interval``); see :class:`CFGDenoiser`."""
    return CFGDenoiser(denoiser, w, uncond, interval)


class ICGDenoiser(nn.Module):
    """Independent condition guidance ``D(x, y_hat) + w (D(x, y) - D(x, y_hat))``.

    ``y_hat`` is independent of ``x``: by default a class drawn uniformly from ``0..num_classes-1``
    for each sample at each call (from ``generator``), put in ``key`` (default ``class_labels``).
    ``condition_fn(cond, x) -> dict`` replaces that rule (e.g. Gaussian noise with the statistics of a
    text embedding); it returns the keyword overrides for the weak pass. The model needs no null token.

    Note: with exact class-conditional scores ICG is *not* CFG (its weak term is ``sum_k pi_k v(x|k)``
    instead of ``sum_k p(k|x) v(x|k)``); never expect ICG == CFG on exact toys.
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        w: float,
        num_classes: int | None = None,
        *,
        key: str = "class_labels",
        condition_fn: Callable[[Mapping[str, Any], torch.Tensor], Mapping[str, Any]] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if condition_fn is None and (num_classes is None or int(num_classes) < 1):
            raise ValueError(f"num_classes must be an int >= 1 unless condition_fn is given, got {num_classes}")
        self.denoiser = denoiser
        self.w = _check_w(w)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.key = key
        self.condition_fn = condition_fn
        self.generator = generator

    def independent_condition(self, x: torch.Tensor, cond: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the weak pass (``cond`` with ``y`` replaced by ``y_hat``)."""
        out = dict(cond)
        if self.condition_fn is not None:
            out.update(self.condition_fn(cond, x))
            return out
        assert self.num_classes is not None
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        y_hat = torch.randint(0, self.num_classes, (x.shape[0],), generator=self.generator, device=gen_device)
        out[self.key] = y_hat.to(x.device)
        return out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        d_c = self.denoiser(x, sigma, **cond)
        if self.w == 1.0:
            return d_c
        d_i = self.denoiser(x, sigma, **self.independent_condition(x, cond))
        return guidance_combine(d_c, d_i, self.w)


def icg(denoiser: DenoiserFn, w: float, num_classes: int | None = None, **kwargs: Any) -> ICGDenoiser:
    """Independent condition guidance at scale ``w``; see :class:`ICGDenoiser`."""
    return ICGDenoiser(denoiser, w, num_classes, **kwargs)


def find_time_embedding(model: nn.Module) -> nn.Module:
    """The first submodule whose name ends in one of :data:`TIME_EMBEDDING_NAMES` (ValueError if none)."""
    for name, mod in model.named_modules():
        if any(name == n or name.endswith("." + n) for n in TIME_EMBEDDING_NAMES):
            return mod
    raise ValueError(
        "module: no time-step embedding found in the denoiser (looked for submodules named "
        f"{TIME_EMBEDDING_NAMES}); pass the embedding module explicitly"
    )


class TSGDenoiser(nn.Module):
    """Time-step guidance ``D(x, emb~) + w (D(x, emb) - D(x, emb~))``.

    The weak pass perturbs the *output of the time-step embedding module* (not sigma):
    ``emb~ = emb + scale * t**alpha * n`` with ``n ~ N(0, I)`` drawn from ``generator`` per call and
    ``t = sigma / (1 + sigma)`` in [0, 1) (flow time, 1 = pure noise). Per-sample ``t`` is used when the
    embedding's first dimension is the batch. Works for unconditional models. ``scale = 0`` or ``w = 1``
    is exactly the unguided denoiser. Defaults ``scale = 1, alpha = 0`` come from a reference
    implementation, not the paper; the scales are model-specific.

    Args:
        denoiser: an ``nn.Module`` denoiser containing the embedding module.
        w: guidance scale >= 0.
        scale: perturbation size s >= 0.
        alpha: exponent of t (>= 0).
        module: the embedding module to perturb; default :func:`find_time_embedding` (denoiser).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        w: float,
        scale: float = 1.0,
        alpha: float = 0.0,
        *,
        module: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.denoiser = denoiser
        self.w = _check_w(w)
        self.scale = float(scale)
        self.alpha = float(alpha)
        self.generator = generator
        if module is None:
            if not isinstance(denoiser, nn.Module):
                raise ValueError("module: denoiser is not an nn.Module, pass the embedding module explicitly")
            module = find_time_embedding(denoiser)
        self._module = [module]  # not registered as a submodule (it belongs to the denoiser)
        self._active_t: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def remove(self) -> None:
        """Detach the forward hook from the embedding module (the wrapper is unusable afterwards)."""
        self._handle.remove()

    def _hook(self, _mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor | None:
        t = self._active_t
        if t is None or self.scale == 0.0:
            return None
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        n = torch.randn(out.shape, generator=self.generator, device=gen_device, dtype=torch.float32)
        n = n.to(device=out.device, dtype=out.dtype)
        amp = t.to(out.device, torch.float32).pow(self.alpha) * self.scale
        if out.ndim >= 1 and amp.numel() == out.shape[0]:
            amp = amp.reshape(-1, *([1] * (out.ndim - 1)))
        else:
            amp = amp.mean()
        return out + amp.to(out.dtype) * n

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        d_c = self.denoiser(x, sigma, **cond)
        if self.w == 1.0 or self.scale == 0.0:
            return d_c
        s = sigma_batch(sigma, x)
        self._active_t = s / (1 + s)
        try:
            d_p = self.denoiser(x, sigma, **cond)
        finally:
            self._active_t = None
        return guidance_combine(d_c, d_p, self.w)


def tsg(denoiser: nn.Module, w: float, scale: float = 1.0, alpha: float = 0.0, **kwargs: Any) -> TSGDenoiser:
    """Time-step guidance at scale ``w``; see :class:`TSGDenoiser`."""
    return TSGDenoiser(denoiser, w, scale, alpha, **kwargs)


class GFTDenoiser(nn.Module):
    """A guidance-free-trained model sampled at ``beta = 1/w``: **one** network call per evaluation.

    ``denoiser(x, sigma, beta=beta_batch, **cond)`` with ``beta_batch`` a ``(B,)`` tensor; give either
    ``w >= 1`` (``beta = 1/w``, the DiT convention; w = 1 is the conditional model) or ``beta`` in (0, 1].
    """

    def __init__(
        self, denoiser: DenoiserFn, w: float | None = None, *, beta: float | None = None, key: str = "beta"
    ) -> None:
        super().__init__()
        if (w is None) == (beta is None):
            raise ValueError("give exactly one of w (>= 1) or beta (in (0, 1])")
        if w is not None:
            w = _check_w(w)
            if w < 1:
                raise ValueError(f"w must be >= 1 for GFT (beta = 1/w in (0, 1]), got {w}")
            beta = 1.0 / w
        assert beta is not None
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        self.denoiser = denoiser
        self.beta = float(beta)
        self.key = key

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        beta = torch.full((x.shape[0],), self.beta, device=x.device, dtype=torch.float32)
        return self.denoiser(x, sigma, **{**cond, self.key: beta})


def gft(denoiser: DenoiserFn, w: float | None = None, *, beta: float | None = None) -> GFTDenoiser:
    """Sample a GFT model at ``beta = 1/w`` (one pass); see :class:`GFTDenoiser`."""
    return GFTDenoiser(denoiser, w, beta=beta)
