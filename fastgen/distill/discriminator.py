"""Discriminator heads for f-distill: logits whose optimum is ``log(p_teacher / q_student)``.

Two kinds, chosen by the method's ``placement`` setting:

- **Heads on network features** (:class:`FeatureDiscriminator`): a :class:`FeatureTap` registers
  forward hooks on named submodules of a backbone (the frozen teacher -- FastGen's default -- or the
  trainable fake-score net -- DMD2's choice) and one :class:`ConvHead` / :class:`VectorHead` per
  layer maps its output to one logit; logits are ``(B, heads)``. Layer names are the keys of
  ``backbone.named_modules()`` (e.g. ``"net.mid_block"`` for an EDM-wrapped ``UNet2DModel``) and
  are validated when the tap is built, so a typo fails at start-up, not after hours.
- **A head on (x_t, log sigma)** (:class:`XSigmaDiscriminator`) for teachers without features, e.g.
  the exact Gaussian-mixture denoiser.

Heads carry no time or class input (as in FastGen). The FastGen conv head is
``[Conv4x4 s2 -> GroupNorm -> SiLU]`` down to 8x8, then ``Conv4x4 s2 -> GN -> SiLU -> Conv4x4 s4 ->
GN -> SiLU -> Conv1x1``; feature maps smaller than 8x8 get ``Conv3x3 -> GN -> SiLU -> global average
pool -> Conv1x1`` instead. Widths equal the input channels.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot take a feature tensor from a module output of type {type(out).__name__}")


class FeatureTap:
    """Forward hooks on named submodules of ``backbone`` that record their outputs while capturing.

    Args:
        backbone: any ``nn.Module``.
        layers: names from ``backbone.named_modules()``; each must exist (``ValueError`` otherwise,
            listing candidates).

    Use ``with tap.capture() as feats: backbone(...)``; ``feats`` then maps layer name to the
    layer's output tensor (the first tensor of a tuple output). Gradients flow through the features
    as through the backbone's normal outputs. Hooks are idle outside ``capture()``.
    """

    def __init__(self, backbone: nn.Module, layers: Sequence[str]) -> None:
        if isinstance(layers, str) or not layers:
            raise ValueError("feature_layers must be a non-empty list of submodule names")
        modules = dict(backbone.named_modules())
        missing = [name for name in layers if name not in modules or name == ""]
        if missing:
            candidates = [n for n in modules if n and n.count(".") <= 2][:40]
            raise ValueError(
                f"feature_layers: {missing} are not submodules of {type(backbone).__name__}; "
                f"available names include {candidates}"
            )
        self.layers = list(layers)
        self._active: dict[str, torch.Tensor] | None = None
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
            if self._active is not None:
                self._active[name] = _first_tensor(out)

        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record the tapped outputs of the forward passes run inside the block."""
        feats: dict[str, torch.Tensor] = {}
        self._active = feats
        try:
            yield feats
        finally:
            self._active = None

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 32), channels)


class ConvHead(nn.Module):
    """FastGen's discriminator head for a ``(B, C, H, W)`` feature map; returns logits ``(B,)``."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        if channels < 1 or size < 1:
            raise ValueError(f"ConvHead needs channels >= 1 and size >= 1, got {channels}, {size}")
        c, s, layers = channels, size, []
        while s > 8:
            layers += [nn.Conv2d(c, c, 4, 2, 1), _gn(c), nn.SiLU()]
            s //= 2
        if s == 8:
            layers += [
                nn.Conv2d(c, c, 4, 2, 1),
                _gn(c),
                nn.SiLU(),
                nn.Conv2d(c, c, 4, 4, 0),
                _gn(c),
                nn.SiLU(),
            ]
        else:
            layers += [nn.Conv2d(c, c, 3, 1, 1), _gn(c), nn.SiLU(), nn.AdaptiveAvgPool2d(1)]
        layers += [nn.Conv2d(c, 1, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.body(feat).mean(dim=(1, 2, 3))


class VectorHead(nn.Module):
    """MLP head for ``(B, C)`` features or ``(B, T, C)`` tokens (mean over tokens); logits ``(B,)``."""

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or channels
        self.body = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        if feat.ndim == 3:
            feat = feat.mean(dim=1)
        return self.body(feat)[:, 0]


def head_for(feature: torch.Tensor) -> nn.Module:
    """A head that fits one example feature tensor (``(B, C, H, W)``, ``(B, C)`` or ``(B, T, C)``)."""
    if feature.ndim == 4:
        return ConvHead(feature.shape[1], min(feature.shape[2], feature.shape[3]))
    if feature.ndim in (2, 3):
        return VectorHead(feature.shape[-1])
    raise ValueError(f"cannot build a discriminator head for a feature of shape {tuple(feature.shape)}")


class FeatureDiscriminator(nn.Module):
    """One head per tapped layer; ``forward(features) -> logits (B, heads)``.

    Build it with :meth:`from_probe` (which runs one forward pass to learn the feature shapes).
    The backbone is *not* a submodule: its parameters belong to whoever owns it (frozen teacher or
    fake-score net), so optimising this module trains the heads only.
    """

    def __init__(self, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.layers = list(heads)
        self.heads = nn.ModuleDict({_key(n): h for n, h in heads.items()})

    @classmethod
    def from_probe(
        cls, backbone: nn.Module, tap: FeatureTap, x: torch.Tensor, sigma: torch.Tensor, **cond: Any
    ) -> FeatureDiscriminator:
        """Run ``backbone(x, sigma, **cond)`` once under ``tap`` and build a head per captured layer."""
        with torch.no_grad(), tap.capture() as feats:
            backbone(x, sigma, **cond)
        absent = [n for n in tap.layers if n not in feats]
        if absent:
            raise ValueError(
                f"feature_layers: {absent} exist but were not called in the backbone's forward pass"
            )
        return cls({n: head_for(feats[n]) for n in tap.layers})

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.heads[_key(n)](features[n].float()) for n in self.layers], dim=1)


def _key(name: str) -> str:
    return name.replace(".", "__")


class XSigmaDiscriminator(nn.Module):
    """An MLP on ``(x_t / sqrt(sigma^2 + sigma_data^2), log(sigma) / 4)``; logits ``(B, 1)``.

    For teachers without features (exact mixtures). ``x_t`` has shape ``(B, *sample_shape)``.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, sigma_data: float = 0.5) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(
                f"XSigmaDiscriminator needs dim, hidden, depth >= 1, got {dim}, {hidden}, {depth}"
            )
        self.sigma_data = float(sigma_data)
        layers: list[nn.Module] = []
        width = dim + 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1).to(x.dtype)
        flat = x.reshape(x.shape[0], -1) / (s**2 + self.sigma_data**2).sqrt()
        return self.body(torch.cat([flat, s.log() / 4], dim=1).float())
