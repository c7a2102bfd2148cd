"""Build the shipped digits text-to-image pipelines ``digits-sd`` and ``digits-sd3`` (fully offline).

Steps (each a function below):
 1. ``build_tokenizers``   - a CLIP BPE tokenizer over a small vocabulary (every prompt word is one token)
                             and a T5 Unigram tokenizer (SD3 only), both without sentencepiece or the hub.
 2. ``train_vae``          - a small ``AutoencoderKL`` (1x8x8 -> 4x4x4 latents) trained on the digits train
                             split (898 images, ``fastgen.data.load_digits_split``); ``scaling_factor`` = 1/std.
 3. ``build_text_encoders``- frozen random ``CLIPTextModel`` (SD) / two ``CLIPTextModelWithProjection`` and a
                             ``T5EncoderModel`` (SD3) built from configs.
 4. ``train_unet``         - ``UNet2DConditionModel``, epsilon prediction, DDIM scaled_linear betas (SD-style).
    ``train_sd3``          - ``SD3Transformer2DModel``, flow matching (x_s = (1-s) z + s n, target n - z,
                             timestep 1000 s), ``FlowMatchEulerDiscreteScheduler`` (shift in its config).
    Both: prompts "a handwritten digit seven" style (3 templates), 10% empty prompt for CFG, AdamW, EMA.
 5. ``save`` + ``evaluate`` - ``save_pretrained`` in fp16 safetensors, reload the folder in float32 and measure
                             FD_digits (vs the test split) and classifier accuracy on the prompted class.
 6. ``write_card``         - README.md model card with the exact command and the numbers.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_digits_pipelines.py --only sd
    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_digits_pipelines.py --only sd3
    .venv/bin/python scripts/build_digits_pipelines.py --quick --out /tmp/p   # seconds, for tests
    # continue training a built pipeline's denoiser (VAE, tokenizers and text encoders are kept as they are):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_digits_pipelines.py --only sd3 --resume-from \
        fastgen/models/weights/pipelines/digits-sd3 --sd3-steps 6000 --lr 3e-4 --out /tmp/sd3-ft

Each run trains the VAE from the same seed, so equal ``--vae-steps`` give identical VAE weights in both folders
(the cards record the steps used).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastgen.data import load_digits_split  # noqa: E402

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("a", "an", "the", "of", "handwritten", "digit", "number", "drawing", "picture", "image") + NUMBERS
TEMPLATES = ("a handwritten digit {}", "the number {}", "a drawing of the digit {}")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,"
MAX_LEN = 16
DEFAULT_OUT = ROOT / "fastgen" / "models" / "weights" / "pipelines"


def prompt_for(label: int, template: int = 0) -> str:
    """The training/eval prompt for a digit class, e.g. ``prompt_for(7) == "a handwritten digit seven"``."""
    return TEMPLATES[template].format(NUMBERS[label])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- 1. tokenizers
def clip_vocab_merges(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """BPE vocab + merges where each word of ``words`` is one token (left-to-right merge chains)."""
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in CHARS:
        tokens += [c, c + "</w>"]
    merges: list[str] = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if f"{cur} {p}" not in merges:
                merges.append(f"{cur} {p}")
            cur += p
            if cur not in tokens:
                tokens.append(cur)
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizers(work: Path):
    """Return ``(clip_tokenizer, t5_tokenizer, src_dir)``; ``src_dir`` holds vocab.json / merges.txt."""
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab, merges = clip_vocab_merges()
    src = work / "tokenizer_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    clip = CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"), model_max_length=MAX_LEN)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS if len(w) > 1]
    pieces += [("\u2581" + c, -4.0) for c in CHARS] + [(c, -5.0) for c in CHARS]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_LEN)
    for w in WORDS:  # gotcha 3: every vocabulary word must be a single token
        ids = clip(w)["input_ids"]
        if len(ids) != 3:
            raise RuntimeError(f"CLIP tokenizer splits {w!r} into {ids}")
    return clip, t5, src


# ---------------------------------------------------------------- 2. VAE
def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=8, force_upcast=False, shift_factor=0.0,
    )


def train_vae(steps: int, seed: int, batch: int = 128, lr: float = 2e-3, kl_weight: float = 1e-4):
    """Train the VAE on the digits train split; returns ``(vae, stats)`` with ``scaling_factor`` set."""
    torch.manual_seed(seed)
    vae = make_vae()
    train, test = load_digits_split("train").images, load_digits_split("test").images
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = train[torch.randint(0, len(train), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        kl = 0.5 * (post.mean**2 + post.var - 1.0 - post.logvar).mean()
        loss = torch.nn.functional.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean_tr = vae.encode(train).latent_dist.mean
        post_te = vae.encode(test).latent_dist
        mse_te = torch.nn.functional.mse_loss(vae.decode(post_te.mean).sample, test).item()
    std = mean_tr.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    stats = {"vae_steps": steps, "vae_test_mse": mse_te, "mean_image_mse": (test - train.mean(0)).pow(2).mean().item(),
             "latent_mean": mean_tr.mean().item(), "latent_std": std, "scaling_factor": 1.0 / std}
    log(f"vae: {stats}")
    return vae, stats


def train_latents(vae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean/std of the train split (unscaled) and the labels; sample = mean + std * eps."""
    split = load_digits_split("train")
    with torch.no_grad():
        post = vae.encode(split.images).latent_dist
    return post.mean, post.std, split.labels


# ---------------------------------------------------------------- 3. text encoders
def clip_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_LEN, projection_dim=32,
                          hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1)


def build_text_encoders(kind: str, clip_tok, t5_tok, seed: int) -> dict:
    """Frozen random text encoders keyed by pipeline component name (``kind`` is "sd" or "sd3")."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg = clip_config(len(clip_tok))
    if kind == "sd":
        torch.manual_seed(seed + 1)
        encs = {"text_encoder": CLIPTextModel(cfg)}
    else:
        torch.manual_seed(seed + 1)
        enc1 = CLIPTextModelWithProjection(cfg)
        torch.manual_seed(seed + 2)
        enc2 = CLIPTextModelWithProjection(cfg)
        torch.manual_seed(seed + 3)
        t5cfg = T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16,
                         feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                         decoder_start_token_id=0)
        encs = {"text_encoder": enc1, "text_encoder_2": enc2, "text_encoder_3": T5EncoderModel(t5cfg)}
    for e in encs.values():
        e.eval().requires_grad_(False)
    return encs


# ---------------------------------------------------------------- 4. denoisers + pipelines
def make_sd_pipeline(vae, clip_tok, encs):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=encs["text_encoder"], tokenizer=clip_tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)


def make_sd3_pipeline(vae, clip_tok, t5_tok, encs, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tr = SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                               attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                               caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=8)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=vae, text_encoder=encs["text_encoder"],
                                    tokenizer=clip_tok, text_encoder_2=encs["text_encoder_2"], tokenizer_2=clip_tok,
                                    text_encoder_3=encs["text_encoder_3"], tokenizer_3=t5_tok)


def prompt_table(pipe, kind: str) -> tuple[dict, int]:
    """Encode every training prompt once (row ``label * len(TEMPLATES) + template``; last row = empty prompt)."""
    prompts = [prompt_for(c, t) for c in range(10) for t in range(len(TEMPLATES))] + [""]
    with torch.no_grad():
        if kind == "sd":
            emb, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            return {"encoder_hidden_states": emb}, len(prompts) - 1
        emb, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                               do_classifier_free_guidance=False, max_sequence_length=MAX_LEN)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}, len(prompts) - 1


TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_flow_time(batch: int, gen: torch.Generator, time_sampling: str = "uniform") -> torch.Tensor:
    """Flow times ``s`` in (0, 1) of shape ``(batch,)`` (s = 1 is pure noise; x_s = (1-s) z + s n).

    ``"uniform"``: s ~ U(0, 1) (one ``torch.rand`` draw, the original recipe). ``"logit_normal"``: s = sigmoid(u),
    u ~ N(0, 1) (SD3's logit-normal sampling with m = 0, s = 1; Esser et al. 2024), which puts more training on
    the middle of the path and less on its ends.
    """
    if time_sampling == "uniform":
        return torch.rand(batch, generator=gen)
    if time_sampling == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=gen))
    raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")


def train_denoiser(pipe, kind: str, steps: int, seed: int, batch: int, lr: float, ema_decay: float,
                   p_uncond: float = 0.1, max_seconds: float | None = None, time_sampling: str = "uniform") -> dict:
    """Train ``pipe.unet`` (eps-MSE) or ``pipe.transformer`` (velocity MSE) in place; loads the EMA at the end.

    ``max_seconds`` stops early (the steps actually done are returned; the LR schedule assumes ``steps``).
    ``time_sampling`` (SD3 only; see ``sample_flow_time``) is how the flow time ``s`` of each example is drawn.
    """
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    net = pipe.unet if kind == "sd" else pipe.transformer
    mean, std, labels = train_latents(pipe.vae)
    scale, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor or 0.0
    table, empty = prompt_table(pipe, kind)
    torch.manual_seed(seed + 10)
    gen = torch.Generator().manual_seed(seed + 11)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    warm = min(200, max(steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 1.0) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))))
    acp = pipe.scheduler.alphas_cumprod if kind == "sd" else None
    t0, losses, hist = time.time(), [], []
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=gen)
        z = ((mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) - shift) * scale
        row = labels[idx] * len(TEMPLATES) + torch.randint(0, len(TEMPLATES), (batch,), generator=gen)
        row = torch.where(torch.rand(batch, generator=gen) < p_uncond, torch.full_like(row, empty), row)
        cond = {k: v[row] for k, v in table.items()}
        noise = torch.randn(z.shape, generator=gen)
        if kind == "sd":
            t = torch.randint(0, 1000, (batch,), generator=gen)
            a = acp[t].view(-1, 1, 1, 1)
            pred = net(a.sqrt() * z + (1 - a).sqrt() * noise, t, **cond).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
        else:
            s = sample_flow_time(batch, gen, time_sampling).view(-1, 1, 1, 1)
            pred = net(hidden_states=(1 - s) * z + s * noise, timestep=1000 * s.flatten(), **cond).sample
            loss = torch.nn.functional.mse_loss(pred, noise - z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        stop = max_seconds is not None and time.time() - t0 > max_seconds
        if (step + 1) % 500 == 0 or step == steps - 1 or stop:
            hist.append((step + 1, sum(losses[-500:]) / len(losses[-500:])))
            log(f"{kind} step {step + 1}/{steps} loss(500) {hist[-1][1]:.4f} {time.time() - t0:.0f}s")
        if stop:
            break
    net.load_state_dict(ema.state_dict())
    net.eval().requires_grad_(False)
    out = {"steps": len(losses), "planned_steps": steps, "batch": batch, "lr": lr, "ema_decay": ema_decay,
           "p_uncond": p_uncond,
           "train_seconds": time.time() - t0, "loss_history": hist,
           "params": sum(p.numel() for p in net.parameters())}
    if kind == "sd3":
        out["time_sampling"] = time_sampling
    return out


# ---------------------------------------------------------------- 5. save + evaluate
def save(pipe, folder: Path, tok_src: Path) -> None:
    """fp16 safetensors, variant-less; vocab.json/merges.txt copied into each CLIP tokenizer folder."""
    if folder.exists():
        shutil.rmtree(folder)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name).is_dir() and (folder / name / "vocab.json").exists() is False:
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(tok_src / f, folder / name / f)


def generate(pipe, kind: str, label: int, n: int, steps: int, cfg: float, seed: int) -> torch.Tensor:
    """``n`` samples of ``prompt_for(label)`` as ``(n, 1, 8, 8)`` images in [-1, 1]."""
    kw = {"max_sequence_length": MAX_LEN} if kind == "sd3" else {}
    out = pipe(prompt_for(label), num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=cfg,
               generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images
    return out.float() * 2.0 - 1.0


def evaluate(folder: Path, kind: str, n_per_class: int, steps: int, cfg: float, seed: int) -> dict:
    """Reload ``folder`` in float32 and measure FD_digits (vs test) and prompted-class accuracy."""
    from diffusers import DiffusionPipeline

    from fastgen.metrics.digits import digits_fd, digits_logits

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    xs = [generate(pipe, kind, c, n_per_class, steps, cfg, seed + c) for c in range(10)]
    x, y = torch.cat(xs), torch.arange(10).repeat_interleave(n_per_class)
    acc = (digits_logits(x).argmax(1) == y).float().mean().item()
    res = {"eval_steps": steps, "cfg": cfg, "n_per_class": n_per_class, "seed": seed, "accuracy": acc,
           "fd_digits": digits_fd(x, "test") if len(x) > 1 else float("nan"), "eval_seconds": time.time() - t0,
           "scheduler": type(pipe.scheduler).__name__}
    log(f"eval {kind}: {res}")
    return res


# ---------------------------------------------------------------- 6. model card
CARD = """# {name}: a tiny trained `{pipe_cls}` on the 8x8 digits

Built offline by `scripts/build_digits_pipelines.py` (fastgen). Load with
`DiffusionPipeline.from_pretrained("{name}_folder")` (fp16 safetensors; pass `torch_dtype=torch.float32` on CPU).
Prompts: "a handwritten digit seven" (also "the number seven", "a drawing of the digit seven"); the empty
prompt is the unconditional branch (trained with {p_uncond:.0%} prompt dropout), so CFG works as usual.
Images: 1 channel, 8x8; `output_type="pt"` gives [0, 1] (x * 2 - 1 is the digits [-1, 1] convention).

## Components
- vae: `AutoencoderKL` 1x8x8 -> 4x4x4, blocks (32, 64), trained {vae_steps} steps on the digits train split
  (898 images): held-out reconstruction MSE {vae_test_mse:.4f} (mean image {mean_image_mse:.3f});
  scaling_factor {scaling_factor:.5f} = 1/std of the train latents, shift_factor 0.
- tokenizer: CLIP BPE over {vocab_size} entries; each of {words} is one token; max length {max_len}.
{components}
- denoiser: {denoiser} ({params:,} parameters), {objective}.
- scheduler (default): {scheduler}.

## Training (seed {seed})
Command: `{command}`
{steps} steps (of {planned_steps} planned; LR schedule over the planned count), batch {batch},
AdamW lr {lr} (warmup + cosine to 0.1x), grad clip 1, EMA {ema_decay}
(the EMA weights are shipped), {train_seconds:.0f} s on a shared 2-core CPU (total build {total_seconds:.0f} s).
Loss (mean over the last 500 steps): {loss_hist}.

## Measured (shipped fp16 weights reloaded in float32)
{n_per_class} samples per class (prompt "a handwritten digit <class>", generator seed {eval_seed}+class),
{eval_steps} steps of the default {eval_sched}, guidance_scale {cfg}:
- FD_digits vs the test split: **{fd_digits:.3f}** (floor: train split vs test split = {floor:.3f};
  bar 2x floor = {bar:.3f})
- digits classifier accuracy on the prompted class: **{accuracy:.3f}** (bar 0.9)
"""


TIME_TEXT = {"uniform": "s ~ U(0,1)", "logit_normal": "s = sigmoid(u), u ~ N(0,1) (SD3 logit-normal time sampling)"}


def write_card(folder: Path, kind: str, info: dict) -> None:
    if kind == "sd":
        comps = "- text_encoder: frozen random `CLIPTextModel` (hidden 32, 2 layers)."
        info.update(pipe_cls="StableDiffusionPipeline", denoiser="`UNet2DConditionModel` (32, 64), cross-attn 32",
                    objective="epsilon prediction on DDIM scaled_linear betas 0.00085-0.012, t ~ U{0..999}",
                    scheduler="DDIMScheduler (scaled_linear, epsilon, steps_offset 1, set_alpha_to_one False)")
    else:
        comps = ("- text_encoder, text_encoder_2: frozen random `CLIPTextModelWithProjection` (hidden 32, proj 32,"
                 " different seeds); text_encoder_3: frozen random `T5EncoderModel` (d_model 64); tokenizer_3: T5"
                 " Unigram.\n  Call with `max_sequence_length=16`.")
        info.update(pipe_cls="StableDiffusion3Pipeline",
                    denoiser="`SD3Transformer2DModel` (4 layers, 4 heads x 16, patch 1)",
                    objective="flow matching x_s = (1-s) z + s n, velocity target n - z, "
                              + TIME_TEXT[info.get("time_sampling", "uniform")] + ", timestep 1000 s",
                    scheduler=f"FlowMatchEulerDiscreteScheduler (shift {info['shift']})")
    hist = info["loss_history"]
    info["loss_hist"] = ", ".join(f"{s}: {v:.4f}" for s, v in hist[:: max(1, len(hist) // 6)] + hist[-1:])
    info["eval_seed"], info["bar"] = info["seed"], 2 * info["floor"]
    info["eval_sched"] = info["scheduler_name"]
    (folder / "README.md").write_text(CARD.format(components=comps, name=folder.name, **info))
    (folder / "build_info.json").write_text(json.dumps(info, indent=1, default=str))


# ---------------------------------------------------------------- main
def build(kind: str, args, clip_tok, t5_tok, tok_src: Path, vae, vae_stats: dict, t_start: float) -> dict:
    encs = build_text_encoders(kind, clip_tok, t5_tok, args.seed)
    torch.manual_seed(args.seed + 5)
    if kind == "sd":
        pipe = make_sd_pipeline(vae, clip_tok, encs)
    else:
        pipe = make_sd3_pipeline(vae, clip_tok, t5_tok, encs, args.shift)
    steps = args.sd_steps if kind == "sd" else args.sd3_steps
    limit = None if args.train_minutes is None else 60 * args.train_minutes
    train = train_denoiser(pipe, kind, steps, args.seed, args.batch, args.lr, args.ema, max_seconds=limit,
                           time_sampling=args.sd3_time_sampling if kind == "sd3" else "uniform")
    folder = Path(args.out) / ("digits-sd" if kind == "sd" else "digits-sd3")
    save(pipe, folder, tok_src)
    ev = evaluate(folder, kind, args.eval_n, args.eval_steps, args.cfg, args.seed)
    from fastgen.metrics.digits import digits_fd

    info = {**vae_stats, **train, **ev, "seed": args.seed, "shift": args.shift, "command": args.command,
            "vocab_size": len(clip_tok), "words": ", ".join(WORDS), "max_len": MAX_LEN,
            "floor": digits_fd(load_digits_split("train").images, "test"), "scheduler_name": ev["scheduler"],
            "total_seconds": time.time() - t_start,
            "folder_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())}
    write_card(folder, kind, info)
    log(f"wrote {folder} ({info['folder_bytes'] / 1e6:.2f} MB)")
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder receiving digits-sd/ and digits-sd3/")
    p.add_argument("--only", choices=("sd", "sd3", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--sd-steps", type=int, default=8000)
    p.add_argument("--sd3-steps", type=int, default=10000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--shift", type=float, default=1.0, help="FlowMatchEuler shift stored in the SD3 scheduler")
    p.add_argument("--sd3-time-sampling", choices=TIME_SAMPLINGS, default="uniform",
                   help="how the SD3 trainer draws the flow time s: 'uniform' (s ~ U(0,1), the original recipe) or "
                        "'logit_normal' (s = sigmoid(N(0,1)), SD3's choice)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--eval-steps", type=int, default=30)
    p.add_argument("--eval-n", type=int, default=100, help="samples per class for the card's numbers")
    p.add_argument("--train-minutes", type=float, default=None, help="stop each denoiser's training after this")
    p.add_argument("--quick", action="store_true", help="tiny step counts (tests); numbers are meaningless")
    p.add_argument("--evaluate-only", default=None, metavar="FOLDER",
                   help="measure a built pipeline folder over --eval-seeds and append the result to its card")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 100, 200],
                   help="generator seeds for --evaluate-only (each: --eval-n samples per class)")
    p.add_argument("--resume-from", default=None,
                   help="a built pipeline folder (with build_info.json): keep its VAE, tokenizers and text "
                        "encoders and continue training its denoiser (--only must name one kind)")
    args = p.parse_args(argv)
    if args.resume_from is not None and args.only == "both":
        p.error("--resume-from continues one pipeline: give --only sd or --only sd3")
    if args.quick:
        args.vae_steps, args.sd_steps, args.sd3_steps, args.batch = 5, 3, 3, 8
        args.eval_n, args.eval_steps = 1, 2
    args.command = " ".join(["python", "scripts/build_digits_pipelines.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def resume(args, t_start: float) -> dict:
    """Continue training the denoiser of ``args.resume_from``; the card lists the earlier commands too."""
    from diffusers import DiffusionPipeline

    src = Path(args.resume_from)
    if not (src / "build_info.json").is_file():
        raise FileNotFoundError(f"--resume-from {src}: no build_info.json (not a folder built by this script)")
    prev = json.loads((src / "build_info.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=torch.float32)
    kind = args.only
    steps = args.sd_steps if kind == "sd" else args.sd3_steps
    limit = None if args.train_minutes is None else 60 * args.train_minutes
    train = train_denoiser(pipe, kind, steps, args.seed + 100, args.batch, args.lr, args.ema, max_seconds=limit,
                           time_sampling=args.sd3_time_sampling if kind == "sd3" else "uniform")
    folder = Path(args.out) / src.name
    if folder.resolve() == src.resolve():
        raise ValueError(f"--out {args.out}: would overwrite --resume-from {src}; write elsewhere and compare")
    save(pipe, folder, src / "tokenizer")
    ev = evaluate(folder, kind, args.eval_n, args.eval_steps, args.cfg, args.seed)
    keep = ("vae_steps", "vae_test_mse", "mean_image_mse", "latent_mean", "latent_std", "scaling_factor",
            "vocab_size", "words", "max_len", "floor", "shift")
    history = prev.get("history", [{k: prev[k] for k in ("command", "steps", "lr", "train_seconds") if k in prev}])
    history.append({"command": args.command, "steps": train["steps"], "lr": args.lr,
                    "train_seconds": train["train_seconds"]})
    train["steps"] = sum(h["steps"] for h in history)
    train["planned_steps"] = train["steps"]
    train["train_seconds"] = sum(h["train_seconds"] for h in history)
    info = {**{k: prev[k] for k in keep}, **train, **ev, "seed": args.seed, "history": history,
            "command": " ; then ".join(h["command"] for h in history), "scheduler_name": ev["scheduler"],
            "total_seconds": time.time() - t_start,
            "folder_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())}
    write_card(folder, kind, info)
    log(f"wrote {folder} ({info['folder_bytes'] / 1e6:.2f} MB)")
    return info


def evaluate_seeds(args) -> dict:
    """``--evaluate-only``: FD_digits / accuracy over several seeds (mean and 95% interval), added to the card."""
    from fastgen.metrics.coverage import mean_ci

    folder = Path(args.evaluate_only)
    info_path = folder / "build_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"--evaluate-only {folder}: no build_info.json (not a folder built by this script)")
    kind = "sd3" if (folder / "transformer").is_dir() else "sd"
    runs = [evaluate(folder, kind, args.eval_n, args.eval_steps, args.cfg, seed) for seed in args.eval_seeds]
    fd, acc = [r["fd_digits"] for r in runs], [r["accuracy"] for r in runs]
    (fd_m, fd_lo, fd_hi), (acc_m, acc_lo, acc_hi) = mean_ci(fd), mean_ci(acc)
    info = json.loads(info_path.read_text())
    bar = 2 * info["floor"]
    line = (f"- over generator seeds {', '.join(map(str, args.eval_seeds))} ({args.eval_n} per class each), "
            f"{args.eval_steps} steps of the default {runs[0]['scheduler']}, guidance_scale {args.cfg}: "
            f"FD_digits **{fd_m:.3f}** [95% interval {fd_lo:.3f}, {fd_hi:.3f}] (per seed "
            f"{', '.join(f'{v:.3f}' for v in fd)}; bar {bar:.3f}: {'met' if fd_m <= bar else '**not met**'}), "
            f"accuracy **{acc_m:.3f}** [{acc_lo:.3f}, {acc_hi:.3f}] (`{args.command}`)\n")
    card = folder / "README.md"
    text = card.read_text()
    head = "\n## Measured over seeds\n"
    card.write_text(text + ("" if head in text else head) + line)
    info.setdefault("seed_evaluations", []).append({"steps": args.eval_steps, "cfg": args.cfg, "seeds": args.eval_seeds,
                                                    "fd_digits": fd, "accuracy": acc})
    info_path.write_text(json.dumps(info, indent=1, default=str))
    log(f"{folder}: FD {fd_m:.3f} [{fd_lo:.3f}, {fd_hi:.3f}], accuracy {acc_m:.3f}")
    return info


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    t_start = time.time()
    log(f"command: {args.command}")
    if args.evaluate_only is not None:
        return [evaluate_seeds(args)]
    if args.resume_from is not None:
        return [resume(args, t_start)]
    with tempfile.TemporaryDirectory() as work:
        clip_tok, t5_tok, tok_src = build_tokenizers(Path(work))
        vae, vae_stats = train_vae(args.vae_steps, args.seed)
        kinds = ("sd", "sd3") if args.only == "both" else (args.only,)
        return [build(k, args, clip_tok, t5_tok, tok_src, vae, vae_stats, t_start) for k in kinds]


if __name__ == "__main__":
    main()
