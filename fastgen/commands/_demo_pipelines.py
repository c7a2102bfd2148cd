"""The text-to-image rows of ``fastgen demo``: prompts -> digits through the shipped pipelines.

For each shipped pipeline (``digits-sd``: a ``StableDiffusionPipeline`` whose default scheduler is DDIM;
``digits-sd3``: a ``StableDiffusion3Pipeline`` with ``FlowMatchEulerDiscreteScheduler``), loaded through
:func:`fastgen.models.load_model`, the prompts "a handwritten digit {zero..nine}" (cycled) and one seeded
latent per sample go through the pipeline itself (``pipe(prompts, latents=z, num_inference_steps=k,
guidance_scale=w, output_type="latent")``, ``w`` the model card's CFG scale) with

- the pipeline's default scheduler (``type(pipe.scheduler).from_config(pipe.scheduler.config)``);
- ``FastgenScheduler(solver="dpmpp_2m", schedule=<the DP schedule shipped for the pipeline at NFE k>)``
  (``fastgen/models/weights/schedules/<pipeline>/``, learned by ``fastgen schedule dp --model <pipeline>``
  in ``scripts/make_pipeline_schedules.sh``);
- ``FastgenScheduler(solver="dpmpp_2m", schedule="karras")`` (full demo only: the solver without the
  learned schedule),

at equal NFE k (network calls per sample; the pipeline batches CFG's two branches into one call), and a
reference: DPM-Solver++(2M) on 30 log-linear steps in the same pipeline from the same latents (its latent
RMSE to a 120-step Heun solve, 30 samples: 0.004 for digits-sd, 0.009 for digits-sd3; the NFE-6 rows are
at 0.05-0.15). Each row has the trajectory error (RMSE of the final latent to the reference's), the
VAE-decoded images (for FD_digits and the grid) and the digits classifier's accuracy on the prompted class.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from fastgen.commands._generate import shipped_schedule_path

PIPELINES = ("digits-sd", "digits-sd3")
CARD_CFG = {"digits-sd": 1.5, "digits-sd3": 1.0}  # the guidance scales of the model cards
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
REFERENCE = ("dpmpp_2m", "loglinear", 30)  # solver, schedule, steps
SCHEDULE_SOLVER = "dpmpp_2m"


@dataclass
class T2IResult:
    """One pipeline run: ``images`` (N, 1, 8, 8) in [-1, 1]; ``rmse`` of the final latent to the reference."""

    method: str
    family: str
    nfe: int
    images: torch.Tensor
    rmse: float
    accuracy: float
    seconds: float


def available_pipelines() -> tuple[list[str], str | None]:
    """The shipped pipelines the demo can run, and why none can (``transformers`` missing) or None."""
    from fastgen.models.sources import PIPELINES_DIR

    if importlib.util.find_spec("transformers") is None:
        return [], "text-to-image rows skipped: the pipelines need transformers (fastgen-diffusion[pipelines])"
    return [p for p in PIPELINES if (PIPELINES_DIR / p / "model_index.json").is_file()], None


def prompts_for(n: int) -> tuple[list[str], torch.Tensor]:
    """``n`` training-style prompts cycling over the ten classes, and their class labels."""
    labels = torch.arange(n) % 10
    return [f"a handwritten digit {DIGITS[int(c)]}" for c in labels], labels


def schedule_for(name: str, nfe: int, fingerprint: str) -> tuple[str | None, str]:
    """The shipped DP schedule path for ``name`` at ``nfe`` (None if none) and a note when it was learned
    for another build of the model (different fingerprint; its sigma range is still checked by the scheduler)."""
    path = shipped_schedule_path(name, "dp", SCHEDULE_SOLVER, nfe)
    if not path.is_file():
        return None, ""
    meta = json.loads(path.read_text()).get("meta", {})
    recorded = (meta.get("model_identity") or {}).get("fingerprint")
    return str(path), ("" if recorded in (None, fingerprint) else " (learned for an earlier build)")


def run_pipeline(name: str, n: int, nfes: list[int], seed: int, device: str, full: bool) -> list[T2IResult]:
    """The reference, default-scheduler and fastgen rows of one shipped pipeline (module docstring)."""
    from fastgen.metrics import digits_logits
    from fastgen.models import load_model
    from fastgen.samplers import FastgenScheduler

    m = load_model(name, device)
    pipe = m.info["pipeline"]
    default = pipe.scheduler
    cfg = dict(default.config)
    prompts, labels = prompts_for(n)
    z = torch.randn(n, *m.shape, generator=torch.Generator().manual_seed(seed))
    w = CARD_CFG.get(name, 1.0)
    extra: dict[str, Any] = {"max_sequence_length": 16} if "StableDiffusion3" in type(pipe).__name__ else {}

    def sample(scheduler: Any, steps: int) -> tuple[torch.Tensor, float]:
        pipe.scheduler = scheduler
        t0 = time.perf_counter()
        with torch.no_grad():
            lat = pipe(prompts, num_inference_steps=steps, guidance_scale=w, latents=z.to(device),
                       output_type="latent", **extra).images
        return lat.float().cpu(), time.perf_counter() - t0

    def result(method: str, family: str, nfe: int, lat: torch.Tensor, secs: float, ref: torch.Tensor) -> T2IResult:
        img = m.decode(lat.to(device)).float().cpu()
        acc = float((digits_logits(img).argmax(1) == labels).float().mean())
        rmse = float(((lat.double() - ref.double()) ** 2).mean().sqrt())
        return T2IResult(method, family, nfe, img, rmse, acc, secs)

    try:
        solver, kind, steps = REFERENCE
        ref, secs = sample(FastgenScheduler.from_config(cfg, solver=solver, schedule=kind), steps)
        out = [result(f"reference, DPM++2M {steps} log-linear steps", "reference", steps, ref, secs, ref)]
        for k in nfes:
            lat, secs = sample(type(default).from_config(cfg), k)
            out.append(result(f"default {type(default).__name__}", "default", k, lat, secs, ref))
            path, note = schedule_for(name, k, m.identity()["fingerprint"])
            if path is not None:
                lat, secs = sample(FastgenScheduler.from_config(cfg, solver=SCHEDULE_SOLVER, schedule=path), k)
                out.append(result(f"fastgen DPM++2M, DP schedule{note}", "fastgen DP", k, lat, secs, ref))
            if full:
                lat, secs = sample(FastgenScheduler.from_config(cfg, solver=SCHEDULE_SOLVER, schedule="karras"), k)
                out.append(result("fastgen DPM++2M, Karras", "fastgen Karras", k, lat, secs, ref))
    finally:
        pipe.scheduler = default
    return out
