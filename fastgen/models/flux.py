"""Flux transformers on unpacked latents: the packing FluxPipeline does around ``FluxTransformer2DModel``.

FluxPipeline keeps its state packed: latents ``(B, C, H, W)`` become ``(B, H/2 * W/2, 4 C)`` tokens
(2x2 patches, ``FluxPipeline._pack_latents``), and positions go in as ``img_ids`` (``(H/2 * W/2, 3)``:
0, row, column) and ``txt_ids`` (zeros, one row per text token). :class:`FluxUnpacked` does this around
the transformer so that fastgen's solvers, guidance and decoders see ordinary ``(B, C, H, W)``
latents (``H``, ``W`` even), the state Diffusers' ``FluxPipeline._unpack_latents`` hands the VAE.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FluxUnpacked", "pack", "unpack", "latent_image_ids", "flux_latent_shape"]


def pack(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, H/2 * W/2, 4 C)``, exactly ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(B, H/2 * W/2, 4 C) -> (B, C, H, W)`` (latent height/width)."""
    b, _, ch = tokens.shape
    x = tokens.view(b, height // 2, width // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, height, width)


def latent_image_ids(height: int, width: int, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(H/2 * W/2, 3)`` position ids of the packed tokens: ``[0, row, column]`` (latent height/width)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_latent_shape(transformer_config: Any, vae_config: Any | None) -> tuple[int, int, int]:
    """Per-sample unpacked latent shape ``(C, S, S)``: ``C = in_channels / 4``; ``S`` = the VAE's
    ``sample_size`` over its scale factor ``2^(levels - 1)`` rounded down to even (FLUX.1: 1024 / 8 = 128),
    else 128 (FluxPipeline's ``default_sample_size``)."""
    channels = int(transformer_config.in_channels) // 4
    side = 128
    if vae_config is not None and getattr(vae_config, "sample_size", None):
        size = vae_config.sample_size
        size = size if isinstance(size, int) else size[0]
        side = 2 * (int(size) // (2 ** (len(vae_config.block_out_channels) - 1)) // 2)
    return channels, side, side


class FluxUnpacked(nn.Module):
    """``FluxTransformer2DModel`` as ``net(x, timestep, encoder_hidden_states, pooled_projections) -> v``
    on unpacked latents ``x`` of shape ``(B, C, H, W)``; ``v`` has ``x``'s shape.

    ``timestep`` is flow time in [0, 1] (the transformer multiplies it by 1000 itself), so wrap this in
    ``DiffusersFlowDenoiser(..., timestep_scale=1.0)``. ``img_ids`` follow from ``H, W``; ``txt_ids``
    are zeros of ``encoder_hidden_states``' length (as FluxPipeline's). Guidance-distilled transformers
    (``guidance_embeds``) get ``guidance`` (FluxPipeline's ``guidance_scale``, default 3.5); others None.
    """

    def __init__(self, transformer: nn.Module, guidance: float = 3.5) -> None:
        super().__init__()
        self.transformer = transformer
        self.guidance = float(guidance)
        self.config = transformer.config

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        guidance = None
        if getattr(self.config, "guidance_embeds", False):
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(hidden_states=pack(x), timestep=timestep, guidance=guidance,
                               pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                               txt_ids=txt_ids, img_ids=latent_image_ids(h, w, x.device, x.dtype),
                               return_dict=False)[0]
        return unpack(out, h, w)
