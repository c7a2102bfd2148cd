"""The schedule gate: best fastgen schedule + solver, and AYS alone, vs the best Diffusers scheduler.

Beds: the digits teacher ``digits-edm`` (class-conditional, uniform random classes; FD_digits), and two
smooth beds the defaults were not tuned on: ``digits-empirical`` (exact denoiser of the 898 train
digits, kernel width 0.25) and a 16-d random Gaussian mixture (6 modes, stds 0.2-0.6, seed 3). For NFE
4, 6, 8, 10 and each seed:

- **fastgen best**: :func:`fastgen.samplers.auto.auto_schedule` over every fastgen solver x (Karras,
  log-linear, DP, LD3 from DP) plus the learned solver (:mod:`fastgen.samplers.learned_solver`:
  schedule + multistep combination coefficients, started from the best candidate of each of the 3
  best one-call solvers, early-stopped on a split of the fit noises), fitted on ``fit`` noises and
  *selected* on ``select`` noises; the winner is then scored on separate ``eval`` noises (selection
  never sees them). "learned(dp) + unipc" names a learned solver started from DP + UniPC.
- **AYS alone**: :func:`fastgen.samplers.ays.optimize_ays` for every solver (early stopping by ODE
  error on the ``select`` noises); the solver whose AYS schedule has the best validation score there
  is scored on the eval noises.
- **Diffusers**: DPM-Solver++ 2M and 3M, UniPC (bh2), DEIS, Euler, each with and without Karras
  sigmas, on a 1000-entry VP table log-linear in sigma over [0.002, 80] (``trained_betas``), the model
  returning eps = (x - D)/sigma at the scheduler's own sigma; the best of the ten *on the eval noises*
  (a selection in Diffusers' favour).

Error = endpoint RMSE to the dopri5 reference (rtol 1e-5) from the same noises. Means over seeds with
95% t-intervals. FD_digits at NFE 4 on 600 noises vs the converged teacher (the reference ODE
samples of the same noises). Run: ``python benchmarks/bench_schedules.py`` (``--quick``: smoke run).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, markdown_table, write_section  # noqa: E402
from fastgen.commands.schedule import TestBed, load_testbed  # noqa: E402
from fastgen.core.ode import reference_solve  # noqa: E402
from fastgen.core.solvers import SOLVERS  # noqa: E402
from fastgen.samplers.auto import auto_schedules  # noqa: E402
from fastgen.samplers.ays import for_solver, ode_validator, optimize_ays  # noqa: E402
from fastgen.samplers.ld3 import LD3Options  # noqa: E402
from fastgen.samplers.schedule import Schedule  # noqa: E402

NFES = (4, 6, 8, 10)
BEDS_DIR = RESULTS / "schedules_beds"
#: (fit, selection, eval noises, LD3 iterations, DP grid) per bed: the neural teacher is the costly one on CPU.
#: The endpoint RMSE of these beds is dominated by rare noises whose trajectory ends in another mode (the
#: report's per-noise line: on random16-mixture the max is 15-290x the median), so the optimisers need
#: enough fit noises to see them and the evaluation enough noises to count them: with 64 fit / 300 eval
#: noises the random16 ratios were 0.64 / 0.45 / 0.45 / 0.45 (seed-to-seed +-0.3). digits-edm: 48 -> 256
#: fit noises and a DP grid of 80 intervals (40 before).
SIZES = {"digits-edm": (256, 256, 600, 30, 80), "digits-empirical": (64, 96, 300, 50, 40),
         "random16-mixture": (4096, 1024, 2000, 50, 40)}
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
#: Diffusers scheduler configurations: name -> (class name, extra config).
DIFFUSERS = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 3M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
}
T95 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% t quantiles by dof


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


def run_diffusers(name: str, karras: bool, den: Any, noise: torch.Tensor, nfe: int, cond: dict[str, Any]
                  ) -> torch.Tensor:
    """Sample with a Diffusers scheduler (``nfe`` model calls) on the VE denoiser ``den``.

    Multistep schedulers work on ``x_vp = x / sqrt(1 + sigma^2)``, Euler on the VE state; at each step
    the "model" returns ``eps = (x - D(x, sigma)) / sigma`` with ``sigma = scheduler.sigmas[step_index]``,
    the sigma the update assumes. The start is ``noise * sigmas[0]`` in VE (sigmas[0] = 80), as for
    fastgen; the result is returned in VE units.
    """
    import diffusers

    cls_name, extra = DIFFUSERS[name]
    cls = getattr(diffusers, cls_name)
    sched = cls.from_config(vp_table_config(), use_karras_sigmas=karras, **extra)
    sched.set_timesteps(nfe)
    sig = sched.sigmas.double()
    ve = cls_name == "EulerDiscreteScheduler"
    x = noise.double() * sig[0]
    sample = (x if ve else x / (1 + sig[0] ** 2).sqrt()).to(noise.dtype)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            s = sig[i]
            if ve:
                sched.scale_model_input(sample, t)  # marks the input as scaled (we pass x ourselves)
            xv = sample if ve else sample * (1 + s**2).sqrt().to(noise.dtype)
            eps = (xv - den(xv, s.to(noise.dtype), **cond)) / s.to(noise.dtype)
            sample = sched.step(eps, t, sample).prev_sample
    last = float(sig[-1])
    return sample if ve else sample * math.sqrt(1 + last**2)


# ----------------------------------------------------------------------------------------------
# Beds
# ----------------------------------------------------------------------------------------------


def mixture_bed() -> TestBed:
    """The 16-d random mixture (6 modes, stds 0.2-0.6, seed 3): smooth, exact, never tuned on."""
    from fastgen.models import load_model

    m = load_model("mixture:random", dim=16, num_modes=6, seed=3)
    data, _ = m.info["mixture"].sample(4096, torch.Generator().manual_seed(0), dtype=torch.float64)
    return TestBed("random16-mixture", m.denoiser, data, None, m.shape, None, torch.float64, m)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def _per_noise(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(median, max) over noises of the per-noise endpoint RMSE: how much of the RMSE the worst noises carry."""
    e = ((a.double() - b.double()) ** 2).flatten(1).mean(1).sqrt()
    return float(e.median()), float(e.max())


def _cond(labels: torch.Tensor | None) -> dict[str, Any]:
    return {} if labels is None else {"class_labels": labels}


def bench_seed(bed: TestBed, seed: int, args: argparse.Namespace, fd: bool) -> dict[str, Any]:
    """One seed on one bed: per NFE the fastgen best, AYS alone and every Diffusers config on eval noises."""
    g = torch.Generator().manual_seed(1000 * seed + 17)
    den = bed.denoiser
    fit, fit_l = bed.noise(args.fit, g)
    sel, sel_l = bed.noise(args.select, g)
    ev, ev_l = bed.noise(args.eval, g)
    ec = _cond(ev_l)
    ref = reference_solve(den, ev * SIGMA_MAX, SIGMA_MAX, **ec)
    out: dict[str, Any] = {"fastgen": {}, "ays": {}, "diffusers": {}, "seconds": {}}
    # AYS validates on the selection noises too (the same budget of unseen noises as auto's choice)
    sel_ref = reference_solve(den, sel * SIGMA_MAX, SIGMA_MAX, **_cond(sel_l))
    t0 = time.perf_counter()
    bests = auto_schedules(den, NFES, fit, sel, methods=("karras", "loglinear", "dp", "ld3", "learned"),
                           sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, dp_options={"grid_size": args.grid},
                           ld3_options=LD3Options(iterations=args.ld3_iterations), generator=g,
                           held_out_cond=_cond(sel_l), held_out_reference=sel_ref, **_cond(fit_l))
    out["seconds"]["auto"] = [time.perf_counter() - t0]
    for nfe in NFES:
        best = bests[nfe]
        with torch.no_grad():
            x = best.sample(den, ev, **ec)
        info = best.meta["auto"]
        base = f"({best.meta['base_method']})" if best.method == "learned" else ""
        out["fastgen"][nfe] = (_rmse(x, ref), f"{best.method}{base} + {best.solver}", info["runner_up_margin"])
        tails = {"fastgen": _per_noise(x, ref)}
        secs = info["optimization_seconds"]
        for kind in ("ld3", "learned"):
            out["seconds"].setdefault(kind, []).extend(v for k, v in secs.items() if k.endswith(f"/{kind}"))
        ays = []
        for solver in SOLVERS:
            val = ode_validator(den, bed.shape, solver, nfe, args.select, SIGMA_MAX, None, noise=sel,
                                reference=sel_ref, **_cond(sel_l))
            t0 = time.perf_counter()
            knots = optimize_ays(den, bed.data, iterations=args.ays_iterations, num_samples=args.ays_samples,
                                 solver=solver, nfe=nfe, validate=val, class_labels=bed.labels, generator=g,
                                 progress=False)
            out["seconds"].setdefault("ays", []).append(time.perf_counter() - t0)
            score = [h["best_score"] for h in knots.meta["history"] if "best_score" in h][-1]
            ays.append((score, solver, for_solver(knots, solver, nfe)))
        _, solver, sched = min(ays, key=lambda a: a[0])
        with torch.no_grad():
            out["ays"][nfe] = (_rmse(sched.sample(den, ev, **ec), ref), solver)
        for name in DIFFUSERS:
            for karras in (False, True):
                label = f"{name}{' Karras' if karras else ''}"
                y = run_diffusers(name, karras, den, ev, nfe, ec)
                out["diffusers"].setdefault(nfe, {})[label] = _rmse(y, ref)
                tails[label] = _per_noise(y, ref)
        best_df = min(out["diffusers"][nfe], key=out["diffusers"][nfe].get)
        out.setdefault("tails", {})[nfe] = {"fastgen": tails["fastgen"], "diffusers": tails[best_df]}
        if fd and nfe == 4:  # FD noises of their own, so they do not depend on what the search drew
            g_fd = torch.Generator().manual_seed(1000 * seed + 99)
            out["fd"], out["fd_noise"] = _fd_at_4(bed, best, g_fd, args.fd_noise), args.fd_noise
            if best.method == "learned":  # the same noises through the schedule the learned solver started from
                start = Schedule(torch.tensor(best.meta["base_sigmas"], dtype=torch.float64), solver=best.solver,
                                 eval_sigmas=None if best.meta["base_eval_sigmas"] is None
                                 else torch.tensor(best.meta["base_eval_sigmas"], dtype=torch.float64))
                out["fd_base"] = _fd_at_4(bed, start, torch.Generator().manual_seed(1000 * seed + 99),
                                          args.fd_noise)[0]
    for nfe in NFES:
        print(f"  nfe {nfe}: fastgen {out['fastgen'][nfe][0]:.4f} ({out['fastgen'][nfe][1]}), ays "
              f"{out['ays'][nfe][0]:.4f} ({out['ays'][nfe][1]}), best diffusers "
              f"{min(out['diffusers'][nfe].values()):.4f}", flush=True)
    return out


def _fd_at_4(bed: TestBed, best: Any, g: torch.Generator, n: int) -> tuple[float, float, float, float]:
    """FD_digits of the NFE-4 winner and of the converged teacher (reference ODE) on the same ``n`` noises,
    then the within-class per-pixel std of each (classes: the labels sampled with; a few-step sampler that
    shrinks each class towards its mean shows here)."""
    from fastgen.metrics.coverage import class_diversity
    from fastgen.metrics.digits import digits_fd

    z, labels = bed.noise(n, g)
    c = _cond(labels)
    with torch.no_grad():
        teacher = reference_solve(bed.denoiser, z * SIGMA_MAX, SIGMA_MAX, **c).float().clamp(-1, 1)
        fast = best.sample(bed.denoiser, z, **c).float().clamp(-1, 1)
    div = [class_diversity(x, labels)["diversity"] if labels is not None else math.nan for x in (fast, teacher)]
    return digits_fd(fast), digits_fd(teacher), div[0], div[1]


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t half-width (0 for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def _fmt(values: list[float]) -> str:
    m, h = _ci(values)
    return f"{m:.3f} ± {h:.3f}"


def summarise(name: str, runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    rows, verdict = [], {"fastgen": {}, "ays": {}}
    for nfe in NFES:
        df_best = [min(r["diffusers"][nfe].values()) for r in runs]
        df_names = [min(r["diffusers"][nfe], key=r["diffusers"][nfe].get) for r in runs]
        fg = [r["fastgen"][nfe][0] for r in runs]
        ay = [r["ays"][nfe][0] for r in runs]
        ratio_fg = [a / b for a, b in zip(fg, df_best)]
        ratio_ay = [a / b for a, b in zip(ay, df_best)]
        verdict["fastgen"][nfe] = _ci(ratio_fg)
        verdict["ays"][nfe] = _ci(ratio_ay)
        rows.append([
            str(nfe), _fmt(df_best), ", ".join(sorted(set(df_names))),
            _fmt(fg), ", ".join(sorted({r["fastgen"][nfe][1] for r in runs})), f"**{_fmt(ratio_fg)}**",
            _fmt(ay), ", ".join(sorted({r["ays"][nfe][1] for r in runs})), f"**{_fmt(ratio_ay)}**",
        ])
    head = ["NFE", "best Diffusers RMSE", "which", "fastgen best RMSE", "winner (selected)", "ratio (<= 0.4)",
            "AYS RMSE", "AYS solver", "AYS ratio (<= 1.0)"]
    text = markdown_table(head, rows)
    dfall = []
    for nfe in NFES:
        labels = list(runs[0]["diffusers"][nfe])
        dfall.append([str(nfe)] + [f"{statistics.fmean(r['diffusers'][nfe][k] for r in runs):.4f}" for k in labels])
    text += "\n\nEvery Diffusers configuration (mean RMSE over seeds):\n\n"
    text += markdown_table(["NFE"] + list(runs[0]["diffusers"][NFES[0]]), dfall)
    sec = {k: [v for r in runs for v in r["seconds"].get(k, [])] for k in ("ays", "ld3", "learned", "auto")}
    text += ("\n\nOptimisation time per schedule (s, mean / max over solvers, NFEs and seeds): "
             + "; ".join(f"{k} {statistics.fmean(v):.2f} / {max(v):.2f}" for k, v in sec.items() if v)
             + " (auto: the whole search, all four NFEs, every solver and method).")
    verdict["seconds"] = {k: statistics.fmean(v) for k, v in sec.items() if v}
    if all("tails" in r for r in runs):
        cells = []
        for nfe in NFES:
            f_med, f_max, d_med, d_max = (statistics.fmean(r["tails"][nfe][who][i] for r in runs)
                                          for who, i in (("fastgen", 0), ("fastgen", 1), ("diffusers", 0),
                                                         ("diffusers", 1)))
            cells.append(f"NFE {nfe}: median {f_med:.4f} / {d_med:.4f}, max {f_max:.3f} / {d_max:.3f}")
        text += ("\n\nPer-noise endpoint RMSE on the eval noises, fastgen winner / best Diffusers (means over seeds): "
                 + "; ".join(cells) + ". The RMSE above is dominated by the few noises whose trajectory ends "
                 "elsewhere (max >> median).")
    if "fd" in runs[0]:
        fast = [r["fd"][0] for r in runs]
        teach = [r["fd"][1] for r in runs]
        rel = [a / b for a, b in zip(fast, teach)]
        verdict["fd"] = _ci(rel)
        text += (f"\n\nFD_digits at NFE 4 ({runs[0]['fd_noise']} noises): fastgen winner {_fmt(fast)}, converged "
                 f"teacher (reference ODE, same noises) {_fmt(teach)}; ratio **{_fmt(rel)}** (target <= 1.10).")
        if all(len(r["fd"]) == 4 for r in runs):
            text += (" Within-class per-pixel std, winner / teacher: "
                     f"{_fmt([r['fd'][2] / r['fd'][3] for r in runs])} (below 1: the winner shrinks each class "
                     "towards its mean, which the per-sample RMSE it was selected by tolerates and FD does not).")
        starts = [(r["fd_base"], r["fd"][1]) for r in runs if "fd_base" in r]
        if starts:
            text += (f" Where the NFE-4 winner is a learned solver ({len(starts)} of {len(runs)} seeds), its starting "
                     f"schedule + solver on the same noises: FD / teacher {_fmt([a / b for a, b in starts])}.")
    return text, verdict


def _claims(verdicts: dict[str, dict[str, Any]]) -> str:
    lines = []
    for bed, v in verdicts.items():
        fg = [f"{n}: {v['fastgen'][n][0]:.2f}" for n in NFES]
        ay = [f"{n}: {v['ays'][n][0]:.2f}" for n in NFES]
        ok_fg = all(v["fastgen"][n][0] <= 0.4 for n in NFES)
        ok_ay = all(v["ays"][n][0] <= 1.0 for n in NFES)
        lines.append(f"- `{bed}`: fastgen best / best Diffusers (mean) {', '.join(fg)} -> "
                     f"{'HOLDS' if ok_fg else 'DOES NOT HOLD'} (<= 0.4 at every NFE); AYS alone {', '.join(ay)} -> "
                     f"{'HOLDS' if ok_ay else 'DOES NOT HOLD'} (<= 1.0)"
                     + (f"; FD@4 / teacher {v['fd'][0]:.3f} -> {'HOLDS' if v['fd'][0] <= 1.1 else 'DOES NOT HOLD'}"
                        if "fd" in v else "")
                     + (f"; AYS {v['seconds']['ays']:.2f} s vs LD3 {v['seconds']['ld3']:.2f} s per schedule"
                        if "ays" in v["seconds"] and "ld3" in v["seconds"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test; numbers not meaningful)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--beds", default="digits-edm,digits-empirical,random16-mixture")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    args.fd_noise = 64 if q else 600
    args.ays_iterations, args.ays_samples = (1, 8) if q else (2, 32)
    seeds = 1 if q else args.seeds
    beds = {"digits-edm": lambda: load_testbed("digits-edm"),
            "digits-empirical": lambda: load_testbed("digits-empirical"), "random16-mixture": mixture_bed}
    body = [__doc__.split("\n\n", 1)[1].rsplit("Run:", 1)[0].strip(), ""]
    for name in args.beds.split(","):
        args.fit, args.select, args.eval, args.ld3_iterations, args.grid = (8, 8, 16, 3, 12) if q else SIZES[name]
        body[1] = (f"{args.fit} fit / {args.select} selection / {args.eval} eval noises per seed; DP grid "
                   f"{args.grid}; LD3 {args.ld3_iterations} iterations; AYS {args.ays_iterations} sweeps, "
                   f"{args.ays_samples} KLUB samples, validated on the selection noises; {args.threads} thread(s)")
        bed, t_bed = beds[name](), time.perf_counter()
        runs = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            runs.append(bench_seed(bed, seed, args, fd=name == "digits-edm"))
            print(f"[{name}] seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
        text, verdict = summarise(name, runs)
        per_nfe = {k: {str(n): list(x) for n, x in verdict[k].items()} for k in ("fastgen", "ays")}
        chunk = {"text": text, "verdict": {**verdict, **per_nfe}, "sizes": body[1], "seeds": seeds, "runs": runs,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "wall_s": round(time.perf_counter() - t_bed)}
        if not q:  # one file per bed, so beds can be (re)measured in separate jobs
            BEDS_DIR.mkdir(parents=True, exist_ok=True)
            (BEDS_DIR / f"{name}.json").write_text(json.dumps(chunk, indent=1))
        print(f"[{name}]\n{text}", flush=True)
    if q:
        return 0
    verdicts = {}
    for name in beds:
        f = BEDS_DIR / f"{name}.json"
        if f.is_file():
            chunk = json.loads(f.read_text())
            v = chunk["verdict"]
            verdicts[name] = {**v, **{k: {int(n): tuple(x) for n, x in v[k].items()} for k in ("fastgen", "ays")}}
            body.append(f"### {name}\n\n_{chunk['seeds']} seeds, measured {chunk['date']} "
                        f"({chunk['wall_s']} s); {chunk['sizes']}_\n\n{chunk['text']}")
    body.insert(1, "**Gate (means over seeds):**\n\n" + _claims(verdicts))
    del body[2]  # the sizes line lives with each bed
    print(_claims(verdicts))
    write_section("schedules", "Schedule gate: fastgen schedule + solver and AYS vs the best Diffusers scheduler",
                  "\n\n".join(body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
