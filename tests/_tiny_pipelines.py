"""Tiny local Diffusers pipeline folders (random weights, no downloads) for the model-source tests.

- :func:`save_sd_pipeline` -- ``StableDiffusionPipeline``: tiny ``UNet2DConditionModel`` (``_tiny_models``),
  a 1-layer ``CLIPTextModel`` over a character vocabulary, a 1-level ``AutoencoderKL`` (1 image channel,
  2 latent channels, 8x8 latents -> 8x8 images).
- :func:`save_sd3_pipeline` -- ``StableDiffusion3Pipeline``: tiny ``SD3Transformer2DModel``, two CLIP
  encoders with projection (no T5), a VAE with ``shift_factor``, ``FlowMatchEulerDiscreteScheduler``.
- :func:`save_flux_pipeline` -- ``FluxPipeline``: tiny ``FluxTransformer2DModel`` (1 double + 1 single
  block, in_channels 16 = 4 x 4 latent channels), CLIP (pooled) + a 1-layer T5 encoder over a Unigram
  vocabulary, a VAE with ``shift_factor`` (8x8 latents, packed 2x2 into 16 tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _tiny_models import _reinit, tiny_cond_unet, tiny_sd3_transformer, vp_scheduler_config

MAX_TOKENS = 8


def tiny_tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose tokens are single characters (bos 0, eos = pad 1)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                        model_max_length=MAX_TOKENS)
    return tok, len(vocab)


def _clip(vocab: int, hidden: int, seed: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                         projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return _reinit(model, seed)


def _vae(latent_channels: int, seed: int, shift: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=latent_channels, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8, layers_per_block=1, scaling_factor=0.7,
                        shift_factor=shift)
    return _reinit(vae, seed, scale=0.5)


def save_sd_pipeline(folder: Path, seed: int = 0) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    tok, vocab = tiny_tokenizer(folder.parent / f"{folder.name}-tok")
    pipe = StableDiffusionPipeline(
        vae=_vae(2, seed + 1), text_encoder=_clip(vocab, 8, seed + 2), tokenizer=tok, unet=tiny_cond_unet(seed),
        scheduler=EulerDiscreteScheduler.from_config(vp_scheduler_config()), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def save_sd3_pipeline(folder: Path, seed: int = 0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok, vocab = tiny_tokenizer(folder.parent / f"{folder.name}-tok")
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, seed + 1, shift=0.1), text_encoder=_clip(vocab, 8, seed + 2, projection=4), tokenizer=tok,
        text_encoder_2=_clip(vocab, 8, seed + 3, projection=4), tokenizer_2=tok, text_encoder_3=None,
        tokenizer_3=None)
    pipe.save_pretrained(str(folder))
    return folder


def tiny_t5(folder: Path, seed: int):
    """A Unigram ``T5Tokenizer`` (pad 0, eos 1, unk 2, one piece per character) and a 1-layer T5 encoder."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)
    cfg = T5Config(vocab_size=len(pieces), d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return tok, _reinit(T5EncoderModel(cfg), seed)


def tiny_flux_pipeline_transformer(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    return _reinit(tr, seed)


def save_flux_pipeline(folder: Path, seed: int = 0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tok, vocab = tiny_tokenizer(folder.parent / f"{folder.name}-tok")
    tok2, t5 = tiny_t5(folder.parent / f"{folder.name}-t5", seed + 3)
    pipe = FluxPipeline(
        transformer=tiny_flux_pipeline_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=_vae(4, seed + 1, shift=0.1), text_encoder=_clip(vocab, 8, seed + 2), tokenizer=tok,
        text_encoder_2=t5, tokenizer_2=tok2)
    pipe.save_pretrained(str(folder))
    return folder
