"""``fastgen demo``: the main job, end to end on the embedded models, offline, in minutes on a CPU.

It samples the embedded class-conditional digits teacher (``digits-edm``) with Diffusers' own
schedulers (Euler, DPM-Solver++(2M) and UniPC, all on Karras sigmas, driven through
:mod:`fastgen.samplers.diffusers_bridge` on the same model and noise) and with fastgen's samplers
(DPM-Solver++(2M) on the AYS-optimized, LD3 and DP schedules shipped for this teacher, Restart, Heun),
samples the shortcut model and the one-step f-distill student, and runs text-to-image through the
shipped pipelines ``digits-sd`` and ``digits-sd3``: prompts "a handwritten digit seven" -> digits with
the pipeline's default scheduler vs fastgen's (``FastgenScheduler``, DPM-Solver++(2M) on the DP schedule
learned for the pipeline) at equal low NFE (:mod:`fastgen.commands._demo_pipelines`). It computes
FD_digits against the held-out digits for each (for the pipelines also the latent trajectory error
to a reference solve and the prompted-class accuracy), prints one table (method, NFE, FD, seconds,
RMSE, accuracy) and writes ``demo/samples.png`` (a labelled grid per method), ``demo/nfe_vs_fd.png``
(the digits teacher) and ``demo/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fastgen.commands._generate import SampleSpec, generate, shipped_schedule_path
from fastgen.models import LoadedModel, load_model

TEACHER = "digits-edm"


@dataclass
class Row:
    method: str
    family: str  # curve name in the plot
    nfe: float
    fd: float
    seconds: float
    pipeline: str | None = None  # text-to-image rows: the pipeline's name
    rmse: float | None = None  # text-to-image rows: final-latent RMSE to the reference solve
    accuracy: float | None = None  # text-to-image rows: digits classifier accuracy on the prompted class


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="sample the embedded digits models with Diffusers' and fastgen's samplers",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--quick", action="store_true", help="a sub-minute version (fewer samples and NFEs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="demo", help="output folder")
    p.add_argument("--num", type=int, default=None, help="samples per method (default 899, quick 300)")
    p.add_argument("--t2i-num", type=int, default=None,
                   help="text-to-image samples per method and pipeline (default 200, quick 50)")
    p.add_argument("--no-pipelines", action="store_true", help="skip the text-to-image pipelines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _diffusers_runner(teacher: LoadedModel, cls_name: str, steps: int) -> Callable[..., tuple[torch.Tensor, int]]:
    import diffusers

    from fastgen.samplers.diffusers_bridge import run_scheduler, vp_config_for_range

    config = vp_config_for_range(teacher.sigma_min, teacher.sigma_max)
    extra: dict[str, Any] = {"use_karras_sigmas": True}
    if cls_name != "EulerDiscreteScheduler":
        extra["final_sigmas_type"] = "zero"
    sched = getattr(diffusers, cls_name).from_config({**config, **extra})

    def run(noise: torch.Tensor, cond: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return run_scheduler(sched, teacher.denoiser, noise, steps, config, **cond)

    return run


def _batched(run: Callable[..., tuple[torch.Tensor, int]], noise: torch.Tensor, labels: torch.Tensor | None,
             batch: int, device: str) -> tuple[torch.Tensor, int]:
    outs, calls = [], 0
    for i in range(0, noise.shape[0], batch):
        cond = {} if labels is None else {"class_labels": labels[i : i + batch].to(device)}
        x, calls = run(noise[i : i + batch].to(device), cond)
        outs.append(x.cpu())
    return torch.cat(outs), calls


def run(args: argparse.Namespace) -> int:
    # Long on purpose: it reads top to bottom as the demo table's rows, in the order they are printed.
    from fastgen.metrics import digits_fd
    from fastgen.models import list_models

    t_start = time.perf_counter()
    from fastgen.io.paths import check_output_path

    out = check_output_path(args.out, "--out", kind="folder")
    n = args.num if args.num is not None else (300 if args.quick else 899)
    if n < 2:
        raise ValueError(f"--num must be >= 2, got {n}")
    t2i_n = args.t2i_num if getattr(args, "t2i_num", None) is not None else (50 if args.quick else 200)
    if t2i_n < 10:
        raise ValueError(f"--t2i-num must be >= 10 (one prompt per class), got {t2i_n}")
    out.mkdir(parents=True, exist_ok=True)
    device, progress = args.device, not args.no_progress
    available = set(list_models())
    if TEACHER not in available:
        raise FileNotFoundError(f"the embedded teacher {TEACHER!r} is missing from fastgen/models/weights")
    teacher = load_model(TEACHER, device)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(n, *teacher.shape, generator=gen)
    labels = teacher.condition(n, class_labels="cycle")[0].get("class_labels")

    rows: list[Row] = []
    grids: list[tuple[str, torch.Tensor]] = []

    def record(method: str, family: str, fn: Callable[[], tuple[torch.Tensor, float]], grid: bool = False) -> None:
        t0 = time.perf_counter()
        x, nfe = fn()
        secs = time.perf_counter() - t0
        fd = digits_fd(x.clamp(-1, 1))
        rows.append(Row(method, family, float(nfe), float(fd), secs))
        if grid:
            grids.append((f"{method} ({nfe:g} NFE) FD {fd:.2f}", x))
        if progress:
            print(f"  {method:<38} NFE {nfe:>4g}  FD {fd:8.3f}  {secs:6.2f}s", flush=True)

    def gen_spec(model: LoadedModel, spec: SampleSpec) -> Callable[[], tuple[torch.Tensor, float]]:
        return lambda: generate(model, spec, n, seed=args.seed, batch_size=1024, class_label="cycle",
                                device=device, progress=False)

    nfes = [6] if args.quick else [4, 6, 8, 10]
    grid_nfe = 6
    # Reference: the teacher at high NFE.
    record("teacher, Heun 35 NFE (reference)", "reference", gen_spec(teacher, SampleSpec("heun", "karras", 18)),
           grid=True)
    # Diffusers' schedulers on the same model and noise.
    for cls_name, label in [("EulerDiscreteScheduler", "Diffusers Euler"),
                            ("DPMSolverMultistepScheduler", "Diffusers DPM++2M"),
                            ("UniPCMultistepScheduler", "Diffusers UniPC")]:
        for k in nfes:
            runner = _diffusers_runner(teacher, cls_name, k)
            record(f"{label} (Karras)", label, lambda r=runner: _batched(r, noise, labels, 1024, device),
                   grid=(k == grid_nfe and cls_name != "EulerDiscreteScheduler"))
    # fastgen: DPM-Solver++(2M) on Karras and on the schedules learned for this teacher.
    for k in nfes:
        record("fastgen DPM++2M, Karras", "fastgen DPM++2M Karras",
               gen_spec(teacher, SampleSpec("dpmpp_2m", "karras", k)))
    for method, label in [("ays", "AYS-optimized"), ("ld3", "LD3"), ("dp", "DP (GITS)")]:
        for k in nfes:
            if not shipped_schedule_path(TEACHER, method, "dpmpp_2m", k).is_file():
                continue
            record(f"fastgen DPM++2M, {label}", f"fastgen {label}",
                   gen_spec(teacher, SampleSpec("dpmpp_2m", method, k)), grid=(k == grid_nfe))
    # Restart vs Heun at moderate NFE.
    from fastgen.core.schedules import karras
    from fastgen.samplers.restart import build_plan, restart_sample

    restart_mains = [5] if args.quick else [4, 5, 7]
    for n_main in restart_mains:
        plan = build_plan(karras(n_main, teacher.sigma_min, teacher.sigma_max), [(3, 1, 0.06, 0.30)])

        def run_restart(plan=plan) -> tuple[torch.Tensor, float]:
            g = torch.Generator(device=device).manual_seed(args.seed + 1)
            x0 = noise.to(device) * float(plan.sigmas[0])
            cond = {} if labels is None else {"class_labels": labels.to(device)}
            with torch.no_grad():
                x = restart_sample(teacher.denoiser, x0, plan=plan, generator=g, **cond)
            return x.cpu(), plan.nfe

        record("fastgen Restart (1 segment)", "fastgen Restart", run_restart, grid=(n_main == restart_mains[-1]))
        heun_steps = (plan.nfe + 1) // 2
        record("fastgen Heun, Karras", "fastgen Heun", gen_spec(teacher, SampleSpec("heun", "karras", heun_steps)))
    # Few-step and one-step models.
    if "digits-shortcut" in available:
        sc = load_model("digits-shortcut", device)
        for k in [1, 4] if args.quick else [1, 2, 4, 8]:
            record("shortcut model", "shortcut", gen_spec(sc, SampleSpec("shortcut", "karras", k)), grid=(k == 4))
    students = sorted(m for m in available if m.startswith("digits-fdistill"))
    for name in students:
        st = load_model(name, device)
        record(f"one-step student ({name})", "one-step student", gen_spec(st, SampleSpec("student", "karras", 1)),
               grid=True)

    if not getattr(args, "no_pipelines", False):
        _pipeline_rows(args, t2i_n, rows, grids, grid_nfe, progress)
    _write_outputs(out, rows, grids, n, time.perf_counter() - t_start)
    return 0


def _pipeline_rows(args: argparse.Namespace, t2i_n: int, rows: list[Row], grids: list[tuple[str, torch.Tensor]],
                   grid_nfe: int, progress: bool) -> None:
    """Text-to-image through the shipped pipelines: default scheduler vs fastgen's at equal NFE."""
    from fastgen.commands._demo_pipelines import available_pipelines, run_pipeline
    from fastgen.metrics import digits_fd

    names, why = available_pipelines()
    if why:
        print(why)
    for name in names:
        results = run_pipeline(name, t2i_n, [6] if args.quick else [4, 6, 8], args.seed, args.device,
                               full=not args.quick)
        for r in results:
            fd = digits_fd(r.images)
            rows.append(Row(f"{name}: {r.method}", f"{name} {r.family}", float(r.nfe), float(fd), r.seconds,
                            pipeline=name, rmse=r.rmse, accuracy=r.accuracy))
            if r.family == "reference" or (r.nfe == grid_nfe and r.family != "fastgen Karras"):
                grids.append((f"{name} {r.family} ({r.nfe} NFE) acc {r.accuracy:.2f}", r.images))
            if progress:
                print(f"  {rows[-1].method:<38} NFE {r.nfe:>4}  FD {fd:8.3f}  RMSE {r.rmse:.4f}  "
                      f"acc {r.accuracy:.3f}  {r.seconds:6.2f}s", flush=True)


def _write_outputs(out: Path, rows: list[Row], grids: list[tuple[str, torch.Tensor]], n: int, total: float) -> None:
    from fastgen.commands._png import labelled_grid, line_plot
    from fastgen.data import load_digits_split
    from fastgen.metrics import digits_fd

    real_fd = digits_fd(load_digits_split("train").images[:n])
    w = max(40, *(len(r.method) + 1 for r in rows))
    header = f"{'method':<{w}} {'NFE':>5} {'FD_digits':>10} {'seconds':>8} {'latent RMSE':>12} {'prompt acc':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        extra = "" if r.pipeline is None else f" {r.rmse:>12.4f} {r.accuracy:>10.3f}"
        lines.append(f"{r.method:<{w}} {r.nfe:>5g} {r.fd:>10.3f} {r.seconds:>8.2f}{extra}")
    lines.append(f"{'real digits (train split, same n)':<{w}} {'-':>5} {real_fd:>10.3f} {'-':>8}")
    if any(r.pipeline for r in rows):
        lines.append("(pipelines: FD over their own sample count; latent RMSE to the pipeline's reference row)")
    table = "\n".join(lines)
    print(table)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.family != "reference" and r.pipeline is None:
            series.setdefault(r.family, []).append((r.nfe, r.fd))
    ref = next((r.fd for r in rows if r.family == "reference"), None)
    hlines = {"real data": real_fd, **({"teacher 35 NFE": ref} if ref is not None else {})}
    line_plot(series, out / "nfe_vs_fd.png", f"FD_digits vs NFE (n={n}, lower is better)", "NFE", "FD_digits",
              size=(900, 520), hlines=hlines)
    labelled_grid(grids, out / "samples.png")
    (out / "results.json").write_text(json.dumps(
        {"num_samples": n, "real_fd": real_fd, "total_seconds": total, "rows": [asdict(r) for r in rows],
         "grid": [label for label, _ in grids]}, indent=1))
    (out / "table.txt").write_text(table + "\n")
    print(f"wrote {out / 'samples.png'}, {out / 'nfe_vs_fd.png'}, {out / 'results.json'} ({total:.1f} s)")
