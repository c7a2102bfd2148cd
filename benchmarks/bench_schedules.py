"""Optimized schedules vs Karras / log-linear and vs Diffusers' multistep schedulers.

For euler, heun, dpmpp_2m and ipndm at NFE 4, 6, 8, 10, on the digits teacher (``digits-edm``;
fallback, clearly labelled: the empirical digits denoiser with bandwidth 0.25) and on the 8-mode
ring mixture (exact denoiser): endpoint RMSE to the reference ODE solution (dopri5, rtol 1e-5) from
the same noises, and FD_digits on the digits bed, for Karras (rho 7), log-linear, AYS-optimized, LD3
and DP schedules; side by side with Diffusers' ``DPMSolverMultistepScheduler`` (Karras sigmas) and
``UniPCMultistepScheduler`` at the same NFE, driven on the same denoiser (see :func:`run_diffusers`).

Heun with a final step to 0 uses 2 * steps - 1 calls, so an even budget runs (NFE + 1) // 2 steps and
leaves one call unused (the "NFE used" is what counts). Run: ``python benchmarks/bench_schedules.py``
(``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from benchmarks.common import RESULTS, markdown_table, write_section
from fastgen.commands.schedule import TestBed, load_testbed
from fastgen.core.ode import reference_solve
from fastgen.core.schedules import karras, loglinear
from fastgen.samplers.ays import for_solver, optimize_ays
from fastgen.samplers.dp import dp_schedules
from fastgen.samplers.ld3 import learn_ld3
from fastgen.samplers.schedule import Schedule, steps_within_nfe

SOLVERS = ("euler", "heun", "dpmpp_2m", "ipndm")
NFES = (4, 6, 8, 10)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SCHEDULES = ("karras", "loglinear", "ays", "ld3", "dp", "ld3-dp")
DIFFUSERS = ("DPMSolverMultistep (Karras)", "UniPCMultistep")


# ----------------------------------------------------------------------------------------------
# Diffusers schedulers on a fastgen VE denoiser
# ----------------------------------------------------------------------------------------------


def vp_table_config(sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, n: int = 1000) -> dict[str, Any]:
    """A DDPM-style config whose 1000-entry training table is log-linear in VE sigma over
    [sigma_min, sigma_max] (given as ``trained_betas``), so Diffusers' schedulers cover the whole range."""
    sig = torch.linspace(math.log(sigma_min), math.log(sigma_max), n, dtype=torch.float64).exp()
    abar = 1 / (1 + sig**2)
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / prev
    return {"num_train_timesteps": n, "trained_betas": betas.tolist(), "prediction_type": "epsilon",
            "beta_schedule": "linear"}


def run_diffusers(name: str, den: Any, noise: torch.Tensor, nfe: int, cond: dict[str, Any]) -> torch.Tensor:
    """Sample with a Diffusers multistep scheduler (``nfe`` model calls) on the VE denoiser ``den``.

    Mapping: the scheduler works on ``x_vp = x / sqrt(1 + sigma^2)``; at each step the "model" returns
    ``eps = (x - D(x, sigma)) / sigma`` with ``sigma = scheduler.sigmas[step_index]``, i.e. the exact
    sigma the scheduler's update assumes (so rounding of Karras sigmas to integer timesteps adds no
    model mismatch). The start is ``noise * sigmas[0]`` in VE (sigmas[0] ~ 80), as for fastgen.
    """
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    cfg = vp_table_config()
    if name.startswith("DPMSolver"):
        sched = DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True, algorithm_type="dpmsolver++",
                                                        solver_order=2)
    else:
        sched = UniPCMultistepScheduler.from_config(cfg)
    sched.set_timesteps(nfe)
    sig = sched.sigmas.double()
    x_vp = (noise.double() * sig[0] / (1 + sig[0] ** 2).sqrt()).to(noise.dtype)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            s = sig[i]
            x = x_vp * (1 + s**2).sqrt().to(noise.dtype)
            d = den(x, s.to(noise.dtype), **cond)
            eps = (x - d) / s.to(noise.dtype)
            x_vp = sched.step(eps, t, x_vp).prev_sample
    return x_vp  # sigma = 0: x_vp = x


# ----------------------------------------------------------------------------------------------
# One test bed
# ----------------------------------------------------------------------------------------------


def _solve(den: Any, sched: Schedule | torch.Tensor, solver: str, noise: torch.Tensor, cond: dict[str, Any]
           ) -> torch.Tensor:
    if not isinstance(sched, Schedule):
        sched = Schedule(sched, solver=solver)
    with torch.no_grad():
        return sched.sample(den, noise, solver=solver, **cond)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def bench_bed(bed: TestBed, args: argparse.Namespace, fd: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    den = bed.denoiser
    noise, labels = bed.noise(args.eval_noise, torch.Generator().manual_seed(1234))
    cond = {} if labels is None else {"class_labels": labels}
    t0 = time.perf_counter()
    ref = reference_solve(den, noise * SIGMA_MAX, SIGMA_MAX, **cond)
    ref_s = time.perf_counter() - t0
    print(f"[{bed.name}] reference ODE for {args.eval_noise} noises: {ref_s:.1f}s", flush=True)
    fd_of = None
    if fd:
        from fastgen.metrics.digits import digits_fd

        fd_of = digits_fd
    rows: dict[tuple[str, str], dict[int, tuple[float, float | None, int]]] = {}
    times: dict[tuple[str, str], list[float]] = {}

    def record(solver: str, method: str, nfe: int, out: torch.Tensor, used: int, secs: float | None) -> None:
        f = fd_of(out.float().clamp(-1, 1)) if fd_of is not None else None
        rows.setdefault((solver, method), {})[nfe] = (_rmse(out, ref), f, used)
        if secs is not None:
            times.setdefault((solver, method), []).append(secs)

    # shared LD3 teacher pairs and DP noises (different from the evaluation noises)
    ld3_noise, ld3_labels = bed.noise(args.ld3_noise, torch.Generator().manual_seed(7))
    ld3_cond = {} if ld3_labels is None else {"class_labels": ld3_labels}
    t0 = time.perf_counter()
    ld3_targets = reference_solve(den, ld3_noise * SIGMA_MAX, SIGMA_MAX, **ld3_cond)
    teacher_s = time.perf_counter() - t0
    dp_noise, dp_labels = bed.noise(args.dp_noise, torch.Generator().manual_seed(8))
    t_bed = time.perf_counter()

    for solver in SOLVERS:
        t0 = time.perf_counter()
        dps = dp_schedules(den, dp_noise, NFES, solver=solver, grid_size=args.grid_size, class_labels=dp_labels,
                           progress=False, model_id=bed.name)
        dp_s = time.perf_counter() - t0
        for nfe in NFES:
            steps = steps_within_nfe(solver, nfe)
            base = {"karras": karras(steps, SIGMA_MIN, SIGMA_MAX), "loglinear": loglinear(steps, SIGMA_MIN, SIGMA_MAX)}
            for name, sig in base.items():
                s = Schedule(sig, solver=solver)
                record(solver, name, nfe, _solve(den, s, solver, noise, cond), s.num_evals(), None)
            t0 = time.perf_counter()
            knots = optimize_ays(den, bed.data, iterations=args.ays_iterations, num_samples=args.ays_samples,
                                 solver=solver, nfe=nfe, val_noise=args.ays_val, class_labels=bed.labels,
                                 generator=g, progress=False, model_id=bed.name)
            ays = for_solver(knots, solver, nfe)
            record(solver, "ays", nfe, _solve(den, ays, solver, noise, cond), ays.num_evals(),
                   time.perf_counter() - t0)
            t0 = time.perf_counter()
            ld3 = learn_ld3(den, ld3_noise, solver=solver, nfe=nfe, targets=ld3_targets,
                            iterations=args.ld3_iterations, class_labels=ld3_labels, generator=g, progress=False,
                            model_id=bed.name)
            record(solver, "ld3", nfe, _solve(den, ld3, solver, noise, cond), ld3.num_evals(),
                   time.perf_counter() - t0)
            record(solver, "dp", nfe, _solve(den, dps[nfe], solver, noise, cond), dps[nfe].num_evals(),
                   dp_s / len(NFES))
            t0 = time.perf_counter()
            ld3dp = learn_ld3(den, ld3_noise, solver=solver, nfe=nfe, targets=ld3_targets, init=dps[nfe],
                              iterations=args.ld3_iterations, class_labels=ld3_labels, generator=g,
                              progress=False, model_id=bed.name)
            record(solver, "ld3-dp", nfe, _solve(den, ld3dp, solver, noise, cond), ld3dp.num_evals(),
                   time.perf_counter() - t0 + dp_s / len(NFES))
        print(f"[{bed.name}] {solver} done ({time.perf_counter() - t_bed:.0f}s)", flush=True)
    for name in DIFFUSERS:
        for nfe in NFES:
            record("diffusers", name, nfe, run_diffusers(name, den, noise, nfe, cond), nfe, None)
    return {"rows": rows, "times": times, "ref_s": ref_s, "teacher_s": teacher_s}


def _tables(res: dict[str, Any], fd: bool) -> tuple[str, dict[str, float]]:
    rows, times = res["rows"], res["times"]
    keys = [(s, m) for s in SOLVERS for m in SCHEDULES] + [("diffusers", d) for d in DIFFUSERS]
    head = ["solver", "schedule"] + [f"NFE {n}" for n in NFES]
    rmse_rows, fd_rows = [], []
    for k in keys:
        cells = rows[k]
        label = k[1] if k[0] != "diffusers" else f"**{k[1]}**"
        rmse_rows.append([k[0], label] + [
            f"{cells[n][0]:.4f}" + (f" ({cells[n][2]})" if cells[n][2] != n else "") for n in NFES])
        if fd:
            fd_rows.append([k[0], label] + [f"{cells[n][1]:.3f}" for n in NFES])
    best_fg = min((rows[k][6][0], k) for k in keys if k[0] != "diffusers")
    best_df = min((rows[k][6][0], k) for k in keys if k[0] == "diffusers")
    text = "Endpoint RMSE to the reference ODE (lower is better; `(n)` = NFE actually used, Heun):\n\n"
    text += markdown_table(head, rmse_rows)
    if fd:
        text += "\n\nFD_digits against the 899 held-out digits (same samples; lower is better):\n\n"
        text += markdown_table(head, fd_rows)
    tm = [[s, m, f"{sum(v) / len(v):.1f}", f"{max(v):.1f}"] for (s, m), v in times.items()]
    text += ("\n\nOptimisation time per schedule (seconds; DP: one run for all four NFEs, divided by 4; "
             "ld3-dp includes that DP share):\n\n")
    text += markdown_table(["solver", "method", "mean s", "max s"], tm)
    summary = {"best_fastgen": best_fg[0], "best_fastgen_name": f"{best_fg[1][1]} + {best_fg[1][0]}",
               "best_diffusers": best_df[0], "best_diffusers_name": best_df[1][1]}
    ratio = summary["best_fastgen"] / summary["best_diffusers"]
    text += (f"\n\n**NFE 6:** best fastgen schedule+solver `{summary['best_fastgen_name']}` RMSE "
             f"{summary['best_fastgen']:.4f} vs best Diffusers `{summary['best_diffusers_name']}` "
             f"{summary['best_diffusers']:.4f}: ratio **{ratio:.3f}** (target <= 0.5).")
    summary["ratio"] = ratio
    return text, summary


def _plot(res: dict[str, Any], title: str, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    for ax, solver in zip(axes, SOLVERS):
        for m in SCHEDULES:
            ax.plot(NFES, [res["rows"][(solver, m)][n][0] for n in NFES], marker="o", label=m)
        for d in DIFFUSERS:
            ax.plot(NFES, [res["rows"][("diffusers", d)][n][0] for n in NFES], ls="--", marker="x", label=d)
        ax.set_yscale("log")
        ax.set_title(solver)
        ax.set_xlabel("NFE")
    axes[0].set_ylabel("endpoint RMSE to reference ODE")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ld3_timing(bed: TestBed) -> tuple[float, int, float, float]:
    """LD3 with its defaults (100 noises, 150 iterations max, dopri5 teacher) for dpmpp_2m at NFE 6."""
    noise, labels = bed.noise(100, torch.Generator().manual_seed(11))
    t0 = time.perf_counter()
    s = learn_ld3(bed.denoiser, noise, solver="dpmpp_2m", nfe=6, class_labels=labels,
                  generator=torch.Generator().manual_seed(0), progress=False)
    return time.perf_counter() - t0, s.meta["iterations"], s.meta["initial_validation"], s.objective


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test; numbers not meaningful)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--beds", default="digits,mixture", help="comma-separated: digits, mixture")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    args.eval_noise = 64 if q else 200
    args.ld3_noise = 16 if q else 40
    args.ld3_iterations = 5 if q else 30
    args.dp_noise = 16 if q else 64
    args.grid_size = 16 if q else 40
    args.ays_iterations = 1 if q else 2
    args.ays_samples = 16 if q else 24
    args.ays_val = 8 if q else 24
    t_all = time.perf_counter()
    try:
        digits = load_testbed("digits-edm")
        digits_label = "the digits teacher `digits-edm` (class-conditional, uniform random classes)"
    except (ValueError, FileNotFoundError):
        digits = load_testbed("digits-empirical")
        digits_label = ("FALLBACK: the empirical digits denoiser with bandwidth 0.25 (the trained teacher "
                        "was not available)")
    body = [
        "Schedules for euler / heun / dpmpp_2m / ipndm on sigma in [0.002, 80] (then 0). Error = endpoint "
        "RMSE to the dopri5 reference (rtol 1e-5) from the same held-out noises. AYS: KLUB optimizer at the "
        "solver's step count, early-stopped by ODE error on 24 validation noises; LD3: 40 noises (20 train / "
        "20 validation, teacher = dopri5), 30 iterations; DP: 64 teacher trajectories on a 40-interval "
        "Karras grid, `coeff=auto`; ld3-dp: LD3 initialised from the DP schedule (the paper's optional GITS "
        "initialisation; its time includes the DP share). Diffusers schedulers run on a 1000-entry VP "
        "table log-linear in sigma "
        "over the same range (`trained_betas`), the model returning eps = (x - D)/sigma at the scheduler's "
        "own sigma.",
    ]
    results = {}
    beds = []
    if "digits" in args.beds:
        beds.append((digits, f"Digits: {digits_label}", True))
    if "mixture" in args.beds:
        beds.append((load_testbed("ring-mixture"), "Ring mixture (8 modes, exact denoiser)", False))
    for bed, title, fd in beds:
        res = bench_bed(bed, args, fd)
        text, summary = _tables(res, fd)
        results[bed.name] = summary
        png = RESULTS / f"schedules_{bed.name}.png"
        _plot(res, title, png)
        body.append(f"### {title}\n\nReference ODE: {res['ref_s']:.1f} s for {args.eval_noise} noises; LD3 "
                    f"teacher pairs: {res['teacher_s']:.1f} s (shared by all LD3 runs).\n\n{text}\n\n"
                    f"![{bed.name}](schedules_{bed.name}.png)")
    secs, iters, v0, v1 = ld3_timing(digits) if not q and "digits" in args.beds else (math.nan, 0, math.nan, math.nan)
    body.append(
        f"### LD3 with its defaults on {digits.name}\n\n`learn_ld3(denoiser, 100 noises, solver='dpmpp_2m', "
        f"nfe=6)` (dopri5 teacher for 100 noises included, 150 iterations max, {args.threads} threads): "
        f"**{secs:.1f} s** ({iters} iterations; validation RMSE {v0:.4f} -> {v1:.4f}). Target <= 180 s."
    )
    body.append(f"Total benchmark wall time: {time.perf_counter() - t_all:.0f} s.")
    write_section("schedules", "Optimized schedules (AYS, LD3, DP) vs Karras and Diffusers", "\n\n".join(body))
    print(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
