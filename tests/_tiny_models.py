"""Seeded builders of tiny Diffusers models and scheduler configs (random weights, no downloads).

Other test files import these; the API is stable:

- :func:`tiny_unet` -- ``UNet2DModel`` (unconditional, ``model(x, timestep)``).
- :func:`tiny_cond_unet` -- ``UNet2DConditionModel`` (``encoder_hidden_states`` of width
  ``cross_attention_dim``) and :func:`tiny_text_states` for a matching conditioning tensor.
- :func:`tiny_sd3_transformer` -- ``SD3Transformer2DModel`` (flow matching, timestep in [0, 1000])
  and :func:`tiny_sd3_cond` for its ``encoder_hidden_states`` / ``pooled_projections``.
- :func:`tiny_flux_transformer` -- ``FluxTransformer2DModel`` (packed latents, timestep in [0, 1])
  and :func:`tiny_flux_cond` for its conditioning keywords.
- :func:`vp_scheduler_config` / :func:`flow_scheduler_config` -- plain-dict scheduler configs.

Every builder takes ``seed`` and re-initialises all parameters from ``torch.Generator(seed)`` with
a scaled normal, so outputs are non-trivial (Diffusers zero-initialises some output layers) and
identical across runs. Models are returned in ``eval()`` mode, float32, on CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SAMPLE_SIZE = 8
CHANNELS = 2
CROSS_DIM = 8


def _reinit(model: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
    """Fill every parameter with N(0, (scale / sqrt(fan_in))^2) from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            std = scale / math.sqrt(max(fan_in, 1))
            if p.ndim == 1:  # biases and norm gains: keep norm gains near 1
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if _looks_like_gain(p) else 0.0))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def _looks_like_gain(p: torch.Tensor) -> bool:
    # Norm weights are initialised to exactly 1 by torch; detect that before overwriting.
    return bool(torch.all(p == 1))


def tiny_unet(
    seed: int = 0, channels: int = CHANNELS, sample_size: int = SAMPLE_SIZE, **overrides: Any
) -> nn.Module:
    """A ~20k-parameter ``UNet2DModel`` (one down/up level with attention)."""
    from diffusers import UNet2DModel

    cfg = dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _reinit(UNet2DModel(**cfg), seed)


def tiny_cond_unet(
    seed: int = 0, channels: int = CHANNELS, sample_size: int = SAMPLE_SIZE, **overrides: Any
) -> nn.Module:
    """A tiny ``UNet2DConditionModel`` with cross-attention of width ``CROSS_DIM``."""
    from diffusers import UNet2DConditionModel

    cfg = dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _reinit(UNet2DConditionModel(**cfg), seed)


def tiny_text_states(batch: int, seq: int = 4, seed: int = 1) -> torch.Tensor:
    """``encoder_hidden_states`` (batch, seq, CROSS_DIM) for :func:`tiny_cond_unet`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, CROSS_DIM, generator=g)


def tiny_sd3_transformer(seed: int = 0, channels: int = 4, sample_size: int = SAMPLE_SIZE) -> nn.Module:
    """A one-layer ``SD3Transformer2DModel`` (patch 2, 2 heads of 8)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=channels,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=channels,
        pos_embed_max_size=16,
    )
    return _reinit(model, seed)


def tiny_sd3_cond(batch: int, seq: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """Conditioning keywords for :func:`tiny_sd3_transformer`."""
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch, seq, 16, generator=g),
        "pooled_projections": torch.randn(batch, 8, generator=g),
    }


def tiny_flux_transformer(seed: int = 0, channels: int = 8) -> nn.Module:
    """A ``FluxTransformer2DModel`` with one double and one single block (packed latents)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    return _reinit(model, seed)


def tiny_flux_cond(
    batch: int, height: int = 4, width: int = 4, seq: int = 4, seed: int = 1
) -> dict[str, Any]:
    """Conditioning keywords for :func:`tiny_flux_transformer` on ``height*width`` packed tokens."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return {
        "encoder_hidden_states": torch.randn(batch, seq, 16, generator=g),
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(seq, 3),
    }


def vp_scheduler_config(
    beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon", **overrides: Any
) -> dict[str, Any]:
    """A DDPM/SD-style VP scheduler config (SD 1.x betas unless ``beta_schedule`` says otherwise)."""
    cfg: dict[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": beta_schedule,
        "prediction_type": prediction_type,
        "timestep_spacing": "linspace",
        "steps_offset": 1,
    }
    if beta_schedule == "linear":
        cfg.update(beta_start=0.0001, beta_end=0.02)
    cfg.update(overrides)
    return cfg


def flow_scheduler_config(shift: float = 1.0, **overrides: Any) -> dict[str, Any]:
    """An SD3-style ``FlowMatchEulerDiscreteScheduler`` config."""
    cfg: dict[str, Any] = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": shift,
    }
    cfg.update(overrides)
    return cfg
