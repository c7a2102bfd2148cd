"""Network builders for the CPU test beds: a residual MLP and a small Diffusers ``UNet2DModel``.

Both nets have the signature the EDM preconditioning (:class:`fastgen.core.denoiser.EDMDenoiser`)
and the flow/shortcut/GFT methods call::

    net(x, t, class_labels=None, **scalars) -> F        # same shape as x

- ``x``: ``(B, *shape)``; the MLP flattens it (``(B, 64)`` digits or ``(B, 1, 8, 8)``, ``(B, d)`` mixtures),
  the UNet expects ``(B, C, H, W)``.
- ``t``: the noise-level input, a float, 0-d or ``(B,)`` tensor. For EDM it is ``c_noise = log(sigma)/4``
  (about -1.6 .. 1.1); for flow matching it is the flow time in [0, 1]. It is embedded with sinusoidal
  features whose periods span ``[min_period, max_period]`` (defaults fit inputs of magnitude <= ~4).
- ``class_labels``: ``None`` (unconditional, i.e. the null label for every row) or an int tensor
  ``(B,)`` in ``0..num_classes`` where the value ``num_classes`` is the null (dropped) label used by
  classifier-free-guidance training. Ignored by nets built with ``num_classes=0``.
- ``**scalars``: extra named scalar conditions declared at build time with ``scalars=("d", "beta")``
  (shortcut step size, GFT beta, ...). Each is a float, 0-d or ``(B,)`` tensor, embedded like ``t``
  and added to the conditioning vector. A declared scalar that is not passed takes its default from
  ``scalar_defaults`` (0.0 unless set); an undeclared name raises ``ValueError``.

Both are registered as network kinds ``"mlp"`` and ``"unet"`` of :mod:`fastgen.models.registry`
(``build_network(kind, **kwargs)``, what the training configs and the model zoo use).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from fastgen.models.registry import build_network, register_network

__all__ = [
    "SinusoidalEmbedding",
    "ConditionEmbedding",
    "ResidualMLP",
    "DigitsUNet",
    "build_network",
    "count_parameters",
]


def _as_batch(v: torch.Tensor | float, batch: int, ref: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, device=ref.device, dtype=torch.float32)
    if t.ndim == 0:
        return t.expand(batch)
    t = t.reshape(-1)
    if t.shape[0] != batch:
        raise ValueError(f"{name} must be a float, 0-d or ({batch},) tensor, got shape {tuple(t.shape)}")
    return t.float()


class SinusoidalEmbedding(nn.Module):
    """``v -> [sin(2 pi v / P_k), cos(2 pi v / P_k)]`` with ``dim/2`` periods ``P_k`` log-spaced in
    ``[min_period, max_period]``, followed by a 2-layer MLP to ``out_dim``. Input ``(B,)``, output
    ``(B, out_dim)``."""

    def __init__(self, out_dim: int, dim: int = 64, min_period: float = 0.005, max_period: float = 20.0):
        super().__init__()
        if dim % 2 or dim < 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        if not 0 < min_period < max_period:
            raise ValueError(f"need 0 < min_period < max_period, got {min_period}, {max_period}")
        periods = torch.exp(torch.linspace(math.log(min_period), math.log(max_period), dim // 2))
        self.register_buffer("freqs", 2 * math.pi / periods, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        arg = v.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=1))


class ConditionEmbedding(nn.Module):
    """Sum of embeddings of ``t``, the class label (with a null label) and named extra scalars.

    Output ``(B, dim)``. ``num_classes=0`` disables class conditioning."""

    def __init__(
        self,
        dim: int,
        num_classes: int = 0,
        scalars: Sequence[str] = (),
        scalar_defaults: Mapping[str, float] | None = None,
        freq_dim: int = 64,
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        scalars = tuple(scalars)
        if len(set(scalars)) != len(scalars) or any(s in ("t", "class_labels") for s in scalars):
            raise ValueError(f"scalars must be distinct names other than 't'/'class_labels', got {scalars}")
        defaults = dict(scalar_defaults or {})
        unknown = set(defaults) - set(scalars)
        if unknown:
            raise ValueError(f"scalar_defaults names {sorted(unknown)} that are not in scalars={scalars}")
        self.num_classes = int(num_classes)
        self.scalars = scalars
        self.scalar_defaults = {s: float(defaults.get(s, 0.0)) for s in scalars}
        self.t_embed = SinusoidalEmbedding(dim, freq_dim)
        self.class_embed = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.scalar_embed = nn.ModuleDict({s: SinusoidalEmbedding(dim, freq_dim) for s in scalars})

    def forward(
        self,
        t: torch.Tensor | float,
        ref: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        **scalars: Any,
    ) -> torch.Tensor:
        b = ref.shape[0]
        unknown = set(scalars) - set(self.scalars)
        if unknown:
            raise ValueError(
                f"unknown conditioning input(s) {sorted(unknown)}; this net accepts {list(self.scalars)}"
            )
        emb = self.t_embed(_as_batch(t, b, ref, "t"))
        if self.class_embed is not None:
            if class_labels is None:
                labels = torch.full((b,), self.num_classes, dtype=torch.long, device=ref.device)
            else:
                labels = torch.as_tensor(class_labels, device=ref.device).long().reshape(-1)
                if labels.ndim == 0 or labels.shape[0] == 1:
                    labels = labels.reshape(()).expand(b)
                if labels.shape[0] != b:
                    raise ValueError(f"class_labels must have shape ({b},), got {tuple(labels.shape)}")
                if (labels < 0).any() or (labels > self.num_classes).any():
                    raise ValueError(
                        f"class_labels must be in 0..{self.num_classes} ({self.num_classes} = null label)"
                    )
            emb = emb + self.class_embed(labels)
        for name in self.scalars:
            v = scalars.get(name)
            v = self.scalar_defaults[name] if v is None else v
            emb = emb + self.scalar_embed[name](_as_batch(v, b, ref, name))
        return emb


class _ResBlock(nn.Module):
    """Pre-norm residual MLP block with FiLM (scale, shift, gate) from the conditioning vector."""

    def __init__(self, width: int, emb_dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 3 * width)
        self.fc1 = nn.Linear(width, mult * width)
        self.fc2 = nn.Linear(mult * width, width)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift, gate = self.film(emb).chunk(3, dim=1)
        y = self.norm(h) * (1 + scale) + shift
        y = self.fc2(self.drop(nn.functional.silu(self.fc1(y))))
        return h + (1 + gate) * y


class ResidualMLP(nn.Module):
    """Residual MLP on flattened inputs: ``in_dim -> width -> depth x ResBlock -> in_dim``.

    Args:
        in_dim: number of input features (64 for digits, d for a mixture); ``x`` may have any shape
            whose trailing dimensions multiply to ``in_dim``; the output has the shape of ``x``.
        width, depth, mult: hidden width, number of residual blocks, expansion in each block.
        emb_dim: conditioning width (defaults to ``width``).
        num_classes, scalars, scalar_defaults: see :class:`ConditionEmbedding`.
        dropout: dropout inside the blocks.
    """

    def __init__(
        self,
        in_dim: int,
        width: int = 256,
        depth: int = 4,
        mult: int = 2,
        emb_dim: int | None = None,
        num_classes: int = 0,
        scalars: Sequence[str] = (),
        scalar_defaults: Mapping[str, float] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("width", width), ("depth", depth), ("mult", mult)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        emb_dim = int(emb_dim or width)
        self.in_dim = int(in_dim)
        self.cond = ConditionEmbedding(emb_dim, num_classes, scalars, scalar_defaults)
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(_ResBlock(width, emb_dim, mult, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, in_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each residual block's activations in backward (``torch.utils.checkpoint``) while
        training with gradients (the Diffusers method name)."""
        self.gradient_checkpointing = True

    @property
    def num_classes(self) -> int:
        return self.cond.num_classes

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        **scalars: Any,
    ) -> torch.Tensor:
        b = x.shape[0]
        flat = x.reshape(b, -1)
        if flat.shape[1] != self.in_dim:
            raise ValueError(f"x must have {self.in_dim} features per row, got shape {tuple(x.shape)}")
        emb = self.cond(t, x, class_labels, **scalars)
        h = self.inp(flat.float())
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, emb, use_reentrant=False) if ckpt else block(h, emb)
        return self.out(self.out_norm(h)).reshape(x.shape).to(x.dtype)


class DigitsUNet(nn.Module):
    """A small Diffusers ``UNet2DModel`` (8x8 by default) whose class and extra-scalar conditioning
    enters through ``class_embed_type="identity"``: a :class:`ConditionEmbedding` of
    ``(class_labels, **scalars)`` is added to the UNet's own time embedding.

    ``t`` is multiplied by ``time_scale`` (250) before the UNet's positional time embedding, so that
    EDM's ``c_noise`` or a flow time in [0, 1] spans a useful range of its frequencies.
    """

    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        block_out_channels: Sequence[int] = (64, 128),
        layers_per_block: int = 1,
        attention: bool = False,
        num_classes: int = 0,
        scalars: Sequence[str] = (),
        scalar_defaults: Mapping[str, float] | None = None,
        time_scale: float = 250.0,
        norm_num_groups: int = 16,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        chans = tuple(int(c) for c in block_out_channels)
        if not chans or any(c % norm_num_groups for c in chans):
            raise ValueError(
                f"block_out_channels must be non-empty multiples of norm_num_groups={norm_num_groups}, "
                f"got {chans}"
            )
        down = ("AttnDownBlock2D" if attention else "DownBlock2D",) * len(chans)
        up = ("AttnUpBlock2D" if attention else "UpBlock2D",) * len(chans)
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=chans,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            attention_head_dim=None if not attention else 8,
            add_attention=attention,
            class_embed_type="identity",
        )
        temb_dim = chans[0] * 4
        self.time_scale = float(time_scale)
        # the UNet embeds t itself; ConditionEmbedding's t branch is fed zeros (kept for a uniform API)
        self.cond = ConditionEmbedding(temb_dim, num_classes, scalars, scalar_defaults)

    @property
    def num_classes(self) -> int:
        return self.cond.num_classes

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        **scalars: Any,
    ) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        b = x.shape[0]
        tt = _as_batch(t, b, x, "t") * self.time_scale
        emb = self.cond(torch.zeros(b, device=x.device), x, class_labels, **scalars)
        return self.unet(x, tt, class_labels=emb.to(x.dtype)).sample


register_network("mlp", ResidualMLP)
register_network("unet", DigitsUNet)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
