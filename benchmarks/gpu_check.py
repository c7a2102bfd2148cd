"""A ready GPU check (``make gpu-check``): what a CUDA machine must confirm about fastgen in under 8 minutes.

1. **precision** -- fp16 and bf16 (autocast) against fp32 for fastgen's solvers (euler, heun, dpmpp_2m on
   the ``digits-edm`` denoiser, 10-step Karras schedule) and for Diffusers schedulers (DDIM, Euler) running
   the ``digits-sd`` pipeline: relative RMSE of the final samples (fp16 unit 2^-11, bf16 2^-8).
2. **attention** -- xformers against PyTorch SDPA: the ``digits-sd`` UNet's output with each (when xformers
   is installed).
3. **samples/s** -- the ``digits-sd`` teacher at its card's default (30 DDIM steps, CFG 1.5: 60 UNet calls)
   against a one-step student (1 UNet call; the f-distill student of section 4, which costs what a trained one
   costs), batch 64, decoded images.
4. **distillation** -- it/s and peak memory of text-to-image f-distill (``fastgen/configs/distill/digits-sd.yaml``)
   at batch 64, in fp32 (``mixed_precision: no``) and, on a GPU, again under bf16 autocast.
5. **FSDP** -- one FSDP2 training step through accelerate (``torchrun`` on the visible GPUs with an FSDP2
   accelerate configuration in the environment).

``python benchmarks/gpu_check.py`` writes the "GPU" section of BENCHMARKS.md naming the device.
``python benchmarks/gpu_check.py --cpu-smoke`` runs every section reduced (tiny batches, 2-step pipelines, no
FSDP launch) on the CPU and prints the results as JSON (``tests/test_trainer_gpu_check.py`` runs it so the
check never rots); it writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMSE ``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def solver_agreement(dev: torch.device, n: int) -> dict[str, dict[str, float]]:
    """fp16/bf16-autocast samples of fastgen's solvers vs fp32 (relative RMSE) on ``digits-edm``."""
    from fastgen.core.schedules import karras
    from fastgen.core.solvers import get_solver
    from fastgen.models import load_model

    m = load_model("digits-edm", device=dev)
    den = m.denoiser
    sigmas = karras(10, m.sigma_min, m.sigma_max).to(dev)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn((n, *m.shape), generator=g) * m.sigma_max).to(dev)
    labels = torch.arange(n, device=dev) % (m.num_classes or 1)
    out: dict[str, dict[str, float]] = {}
    for solver in ("euler", "heun", "dpmpp_2m"):
        fn = get_solver(solver)
        with torch.no_grad():
            ref = fn(den, x, sigmas, class_labels=labels)
            out[solver] = {}
            for name, dt in DTYPES.items():
                with torch.autocast(dev.type, dtype=dt):
                    y = fn(den, x, sigmas, class_labels=labels)
                out[solver][name] = _rel(y.float(), ref)
    return out


def _pipeline(dev: torch.device, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionPipeline

    path = REPO / "fastgen" / "models" / "weights" / "pipelines" / "digits-sd"
    pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def scheduler_agreement(dev: torch.device, n: int, steps: int) -> dict[str, dict[str, float]]:
    """Latents of the ``digits-sd`` pipeline with Diffusers schedulers, fp16/bf16 weights vs fp32."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    prompts = [f"a handwritten digit {w}" for w in ("zero", "three", "seven", "nine")]
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    out: dict[str, dict[str, float]] = {}
    pipes = {"fp32": _pipeline(dev)}
    for name, dt in DTYPES.items():
        pipes[name] = _pipeline(dev, dt)
    for sched_cls in (DDIMScheduler, EulerDiscreteScheduler):
        lat = {}
        for name, pipe in pipes.items():
            pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
            g = torch.Generator().manual_seed(0)
            noise = torch.randn((n, pipe.unet.config.in_channels, 4, 4), generator=g)
            with torch.no_grad():
                lat[name] = pipe(prompts, num_inference_steps=steps, guidance_scale=1.5, output_type="latent",
                                 latents=noise.to(dev, pipe.unet.dtype)).images.float()
        out[sched_cls.__name__] = {k: _rel(lat[k], lat["fp32"]) for k in DTYPES}
    return out


def attention_agreement(dev: torch.device) -> dict[str, Any]:
    """xformers vs SDPA on the ``digits-sd`` UNet (max abs and relative RMSE of the output)."""
    if importlib.util.find_spec("xformers") is None:
        return {"status": "skipped: xformers is not installed"}
    if dev.type != "cuda":
        return {"status": "skipped: xformers needs CUDA"}
    pipe = _pipeline(dev, torch.float16)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn((8, unet.config.in_channels, 4, 4), generator=g).to(dev, torch.float16)
    ids = pipe.tokenizer(["a handwritten digit seven"] * 8, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        t = torch.full((8,), 500, device=dev)
        sdpa = unet(x, t, encoder_hidden_states=emb).sample.float()
        try:  # Diffusers runs a tiny xformers attention first: a build without kernels for this torch fails here
            unet.enable_xformers_memory_efficient_attention()
        except (NotImplementedError, RuntimeError, ValueError) as err:
            import xformers

            why = ("it was built without CUDA kernels for this torch" if "build with CUDA support" in str(err)
                   else str(err).splitlines()[0])
            return {"status": f"failed: xformers {xformers.__version__} cannot run on torch {torch.__version__}: "
                              f"{why} (python -m xformers.info)"}
        xf = unet(x, t, encoder_hidden_states=emb).sample.float()
    return {"status": "ok", "max_abs": float((xf - sdpa).abs().max()), "rel_rmse": _rel(xf, sdpa)}


def _timed(dev: torch.device, fn, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (device synchronised around each)."""
    out = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def _run_overrides(dev: torch.device, batch: int, out: str, precision: str) -> list[str]:
    """The ``--set`` overrides every timed distillation run shares."""
    over = [f"batch_size={batch}", f"output_dir={out}", "progress=false", "num_threads=null",
            f"cpu={'true' if dev.type == 'cpu' else 'false'}", "resume=none"]
    return over + ([f"mixed_precision={precision}"] if precision != "no" else [])


def _t2i_trainer(dev: torch.device, batch: int, out: str, smoke: bool, precision: str = "no"):
    import fastgen.distill  # noqa: F401  (registers fdistill and the t2i data set)
    from fastgen.train import Trainer
    from fastgen.train.config import load_config

    over = _run_overrides(dev, batch, out, precision) + [
        "data.cache_dir=null",
        "method.regression_steps=0",  # time the distribution-matching steps, not the warm-up regression
    ]
    if smoke:
        over += ["data.real_per_prompt=1", "data.teacher_steps=2"]
    cfg = load_config(REPO / "fastgen" / "configs" / "distill" / "digits-sd.yaml", over)
    return Trainer(cfg)


def distillation(dev: torch.device, batch: int, steps: int, smoke: bool, precision: str = "no",
                 repeats: int = 3) -> tuple[dict[str, Any], Any]:
    """Text-to-image f-distill it/s (mean over ``repeats`` windows of ``steps`` steps after one warm-up step,
    with the slowest and fastest window) and peak memory at ``batch`` under ``mixed_precision`` ``precision``
    (falls back to the unconditional digits f-distill when the text-to-image path cannot be built, and says so)."""
    out = tempfile.mkdtemp(prefix="fastgen-gpu-check-")
    path = "text-to-image (digits-sd, CFG 1.5)"
    try:
        tr = _t2i_trainer(dev, batch, out, smoke, precision)
    except Exception as err:  # noqa: BLE001 -- report what failed, measure the unconditional path instead
        from fastgen.train import Trainer
        from fastgen.train.config import load_config

        path = f"unconditional digits f-distill (text-to-image failed: {type(err).__name__}: {err})"
        cfg = load_config(REPO / "fastgen" / "configs" / "distill" / "digits-js.yaml",
                          _run_overrides(dev, batch, out, precision))
        tr = Trainer(cfg)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    tr.train_step()  # warm-up (student and critic steps alternate: time whole cycles)
    losses: set[str] = set()

    def window() -> None:
        for _ in range(steps):
            losses.update(k for k in tr.train_step() if k.startswith("loss/"))

    rates = [steps / t for t in _timed(dev, window, repeats)]
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return {"path": path, "mixed_precision": precision, "batch": batch, "steps_timed": steps, "repeats": repeats,
            "it_per_s": sum(rates) / len(rates), "it_per_s_min": min(rates), "it_per_s_max": max(rates),
            "peak_mib": peak, "losses": sorted(losses)}, tr


def samples_per_s(dev: torch.device, tr: Any, n: int, teacher_steps: int, repeats: int = 3) -> dict[str, Any]:
    """Decoded samples/s of the teacher pipeline (``teacher_steps`` DDIM steps, CFG 1.5) and of the one-step
    student of ``tr`` (its f-distill student), at batch ``n``: the mean over ``repeats`` timed calls after one
    warm-up, with the slowest and fastest call's rate."""
    pipe = _pipeline(dev)
    prompts = ["a handwritten digit seven"] * n
    m = tr.method
    student = copy.deepcopy(tr.ema_network("student")).eval()
    cond = m._cond(torch.zeros(n, dtype=torch.long, device=dev))  # prompt (or class) 0 of the run's table
    z = torch.randn((n, *m.config.sample_shape), generator=torch.Generator().manual_seed(0)).to(dev)

    def teacher() -> None:
        pipe(prompts, num_inference_steps=teacher_steps, guidance_scale=1.5, output_type="pt")

    def one_step() -> None:
        x = student(z, cond)
        if hasattr(pipe, "vae") and x.shape[1] == pipe.vae.config.latent_channels:
            pipe.vae.decode(x / pipe.vae.config.scaling_factor)

    with torch.no_grad():
        pipe(prompts[:1], num_inference_steps=1, output_type="pt")  # warm-ups
        one_step()
        t_teacher, t_student = _timed(dev, teacher, repeats), _timed(dev, one_step, repeats)
    rate = {name: [n / t for t in ts] for name, ts in (("teacher", t_teacher), ("student", t_student))}
    res: dict[str, Any] = {"batch": n, "repeats": repeats, "teacher_unet_calls": 2 * teacher_steps,
                           "student_unet_calls": 1}
    for name, rs in rate.items():
        res[f"{name}_samples_per_s"] = sum(rs) / len(rs)
        res[f"{name}_samples_per_s_min"], res[f"{name}_samples_per_s_max"] = min(rs), max(rs)
    res["speed_up"] = res["student_samples_per_s"] / res["teacher_samples_per_s"]
    return res


_FSDP_STEP = """
import torch
from fastgen.train import Trainer
from fastgen.train.config import config_from_dict
cfg = config_from_dict({"output_dir": "%s", "steps": 1, "batch_size": 64, "progress": False, "resume": "none",
    "data": {"name": "mixture", "mixture": "ring", "num_samples": 256},
    "network": {"kind": "mlp", "in_dim": 2, "width": 256, "depth": 3}, "method": {"name": "edm"}})
tr = Trainer(cfg)
logs = tr.train_step()
if tr.acc.is_main_process:
    print("FSDP_RESULT", tr.acc.distributed_type, tr.world, logs["loss/main"], flush=True)
"""


def fsdp_step(dev: torch.device) -> dict[str, Any]:
    """One FSDP2 step of the trainer under ``torchrun`` on all visible GPUs (FSDP2 accelerate environment)."""
    if dev.type != "cuda":
        return {"status": "skipped: accelerate selects FSDP only on GPUs (tests/test_distributed.py runs the "
                          "trainer's FSDP2 path on gloo)"}
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "fsdp_step.py"
        script.write_text(_FSDP_STEP % out)
        # the repository first, the environment's own path after it (packages installed beside the image's)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "PYTHONPATH": path}
        nproc = max(1, torch.cuda.device_count())
        torchrun = Path(sys.executable).with_name("torchrun")
        r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(nproc), str(script)],
                           env=env, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("FSDP_RESULT")), None)
    if r.returncode != 0 or line is None:
        return {"status": f"failed (exit {r.returncode})", "tail": (r.stdout + r.stderr)[-1500:]}
    _, kind, world, loss = line.split()
    return {"status": "ok", "distributed_type": kind, "processes": int(world), "loss": float(loss)}


def _save(res: dict[str, Any], path: Path | None) -> None:
    """Write ``res`` as JSON to ``path`` atomically (after every section: a run stopped at its time limit keeps
    what it measured)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)


def run(smoke: bool, json_path: Path | None = None) -> dict[str, Any]:
    dev = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if smoke:
        torch.set_num_threads(1)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU",
                           "smoke": smoke, "seconds": {}}
    batch, steps = (4, 5) if smoke else (64, 20)  # whole student + critic cycles (student_every 5)
    state: dict[str, Any] = {}

    def distill() -> dict[str, Any]:
        out, state["trainer"] = distillation(dev, batch, steps, smoke)
        return out

    def distill_bf16() -> dict[str, Any]:
        out, tr = distillation(dev, batch, steps, smoke, precision="bf16")
        del tr
        return out

    def samples() -> dict[str, Any]:
        if state.get("trainer") is None:
            return {"status": "skipped: no student (distillation failed)"}
        return samples_per_s(dev, state["trainer"], 4 if smoke else 64, 2 if smoke else 30)

    sections = [
        ("solvers", lambda: solver_agreement(dev, 4 if smoke else 64)),
        ("schedulers", lambda: scheduler_agreement(dev, 1 if smoke else 16, 2 if smoke else 30)),
        ("attention", lambda: attention_agreement(dev)),
        ("distillation", distill),
    ]
    if dev.type == "cuda":  # bf16 autocast on a CPU measures nothing a user runs
        sections.append(("distillation_bf16", distill_bf16))
    sections += [("samples", samples), ("fsdp", lambda: fsdp_step(dev))]
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as err:  # noqa: BLE001 -- a check that fails is a result, the others still run
            res[name] = {"status": f"failed: {type(err).__name__}: {err}"}
        res["seconds"][name] = time.perf_counter() - t0
        print(f"gpu_check: {name} done in {res['seconds'][name]:.1f} s", file=sys.stderr, flush=True)
        _save(res, json_path)
    return res


def _markdown(res: dict[str, Any]) -> str:
    from benchmarks.common import markdown_table

    lines = [f"Device: **{res['device']}**. Produced by `make gpu-check` (`benchmarks/gpu_check.py`).", ""]
    for key in ("solvers", "schedulers"):
        sec = res[key]
        if "status" in sec:
            lines += [f"- {key}: {sec['status']}", ""]
            continue
        lines += [f"Relative RMSE vs fp32 ({key}):", "",
                  markdown_table([key[:-1], "fp16", "bf16"], [[k, v["fp16"], v["bf16"]] for k, v in sec.items()]), ""]
    for key in ("attention", "distillation", "distillation_bf16", "samples", "fsdp"):
        if key not in res:
            continue
        # a failure's first line here (its whole message, and a launch's output tail, stay in the JSON)
        lines.append(f"- {key}: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else
                                              f"{k} = {str(v).splitlines()[0] if v else v}"
                                              for k, v in res[key].items() if k != "tail"))
    lines += ["", "Seconds per section: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="reduced run on the CPU; print JSON, write nothing")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here after every section")
    args = ap.parse_args(argv)
    res = run(args.cpu_smoke, args.json)
    if args.cpu_smoke:
        print(json.dumps(res))
        return 0
    from benchmarks.common import assemble, write_section

    write_section("gpu", "GPU", _markdown(res), script="gpu_check")
    with contextlib.suppress(Exception):
        assemble()
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
