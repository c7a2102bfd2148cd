"""The shipped digits text-to-image pipelines (``fastgen/models/weights/pipelines/digits-sd{,3}``).

They are real Diffusers folders: ``DiffusionPipeline.from_pretrained(folder)`` offline, prompts as strings,
fp16 safetensors on disk. The quality check (prompted-class accuracy of the shipped digits classifier) fails
for an untrained or mis-wired pipeline (chance is 0.1).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
PIPES = ROOT / "fastgen" / "models" / "weights" / "pipelines"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
KINDS = {"digits-sd": "StableDiffusionPipeline", "digits-sd3": "StableDiffusion3Pipeline"}
CFG = {"digits-sd": 1.5, "digits-sd3": 1.0}  # the model cards' guidance scales


def _script():
    path = ROOT / "scripts" / "build_digits_pipelines.py"
    spec = importlib.util.spec_from_file_location("build_digits_pipelines", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extra(name: str) -> dict:
    return {"max_sequence_length": 16} if name == "digits-sd3" else {}


@pytest.fixture(scope="module", params=sorted(KINDS))
def shipped(request):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(PIPES / request.param, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


@pytest.mark.parametrize("name", sorted(KINDS))
def test_folder_is_small_fp16_and_self_contained(name):
    from diffusers import DiffusionPipeline

    folder = PIPES / name
    index = (folder / "model_index.json").read_text()
    assert f'"{KINDS[name]}"' in index
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 10e6
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.fp16.*"))  # variant-less safetensors
    for tok in ("tokenizer", "tokenizer_2") if name == "digits-sd3" else ("tokenizer",):
        assert (folder / tok / "vocab.json").is_file() and (folder / tok / "merges.txt").is_file()
    from safetensors.torch import load_file

    for f in folder.rglob("*.safetensors"):  # stored in fp16
        assert {t.dtype for t in load_file(f).values()} == {torch.float16}, f
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    den = pipe.unet if name == "digits-sd" else pipe.transformer
    assert next(den.parameters()).dtype == torch.float16
    assert "FD_digits" in (folder / "README.md").read_text()


def test_tokenizer_vocabulary_words_are_single_tokens(shipped):
    name, pipe = shipped
    tok = pipe.tokenizer
    words = ["a", "the", "handwritten", "digit", "number", "drawing", "of", *NUMBERS]
    for w in words:
        ids = tok(w)["input_ids"]
        assert len(ids) == 3 and ids[0] == 0 and ids[-1] == 1, (w, ids)
    padded = tok("a handwritten digit seven", padding="max_length", max_length=16)["input_ids"]
    assert len(padded) == 16 and padded[:2] == [0, tok.convert_tokens_to_ids("a</w>")] and padded[-1] == 1
    assert len(tok("zebra")["input_ids"]) > 3  # unknown words fall back to characters / merge pieces
    if name == "digits-sd3":
        t5 = pipe.tokenizer_3
        assert all(len(t5(w)["input_ids"]) == 2 for w in NUMBERS)  # one piece + </s>


def test_generate_shapes_and_ranges(shipped):
    name, pipe = shipped
    out = pipe("a handwritten digit seven", num_inference_steps=4, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np", **_extra(name)).images
    assert out.shape == (1, 8, 8, 1) and out.min() >= 0.0 and out.max() <= 1.0
    img = pipe("the number three", num_inference_steps=2, **_extra(name)).images[0]
    assert img.mode == "L" and img.size == (8, 8)


def test_prompted_class_accuracy(shipped):
    """50 samples (5 per class) at 20 default-scheduler steps, the card's CFG: the classifier reads the prompt."""
    from fastgen.metrics.digits import digits_logits

    name, pipe = shipped
    prompts = [f"a handwritten digit {w}" for w in NUMBERS]
    x = pipe(prompts, num_images_per_prompt=5, num_inference_steps=20, guidance_scale=CFG[name],
             generator=torch.Generator().manual_seed(123), output_type="pt", **_extra(name)).images
    assert x.shape == (50, 1, 8, 8)
    acc = (digits_logits(x.float() * 2 - 1).argmax(1) == torch.arange(10).repeat_interleave(5)).float().mean()
    assert acc >= 0.8, (name, float(acc))


def test_component_builders_save_and_reload(tmp_path):
    """The script's builders: tokenizer facts, a 2-step SD3 training run, fp16 save, float32 reload."""
    from diffusers import DiffusionPipeline

    mod = _script()
    clip, t5, src = mod.build_tokenizers(tmp_path / "work")
    vocab, merges = mod.clip_vocab_merges()
    assert len(clip) == len(vocab) and all(len(clip(w)["input_ids"]) == 3 for w in mod.WORDS)
    encs = mod.build_text_encoders("sd3", clip, t5, seed=0)
    pipe = mod.make_sd3_pipeline(mod.make_vae(), clip, t5, encs, shift=1.0)
    info = mod.train_denoiser(pipe, "sd3", steps=2, seed=0, batch=4, lr=1e-3, ema_decay=0.9)
    assert info["steps"] == 2 and len(info["loss_history"]) == 1
    mod.save(pipe, tmp_path / "p", src)
    assert (tmp_path / "p" / "tokenizer_2" / "merges.txt").is_file()
    back = DiffusionPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.float32)
    w0 = pipe.transformer.pos_embed.proj.weight
    w1 = back.transformer.pos_embed.proj.weight
    assert w1.dtype == torch.float32 and torch.equal(w1, w0.half().float())
    assert back.scheduler.config.shift == 1.0 and back.tokenizer("seven")["input_ids"] == clip("seven")["input_ids"]


def test_sd3_flow_time_sampling():
    """``uniform`` is the original ``torch.rand`` draw (old builds reproduce bit-for-bit); ``logit_normal`` is
    sigmoid(N(0, 1)): symmetric about 0.5, with 2*Phi(-1) ~= 0.317 of its mass outside [sigmoid(-1), sigmoid(1)]
    (uniform: 1 - 0.462 = 0.538 there)."""
    mod = _script()
    u = mod.sample_flow_time(4000, torch.Generator().manual_seed(3), "uniform")
    assert torch.equal(u, torch.rand(4000, generator=torch.Generator().manual_seed(3)))
    s = mod.sample_flow_time(4000, torch.Generator().manual_seed(3), "logit_normal")
    assert s.shape == (4000,) and 0 < s.min() and s.max() < 1
    assert abs(s.median().item() - 0.5) < 0.03  # binomial sd of the median ~ 0.25/sqrt(4000)/pdf ~ 0.01
    lo, hi = torch.sigmoid(torch.tensor(-1.0)), torch.sigmoid(torch.tensor(1.0))
    outside = ((s < lo) | (s > hi)).float().mean().item()
    assert abs(outside - 0.3173) < 0.03  # binomial sd sqrt(0.32 * 0.68 / 4000) ~ 0.007
    with pytest.raises(ValueError, match="time_sampling"):
        mod.sample_flow_time(4, torch.Generator(), "cosine")
