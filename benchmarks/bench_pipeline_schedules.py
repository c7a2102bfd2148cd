"""Schedules learned through the CLI vs a shipped pipeline's own Diffusers schedulers (issue 14).

For the shipped text-to-image pipelines ``digits-sd`` and ``digits-sd3`` (each loaded fresh through
``fastgen.models.load_model``):

- fastgen: ``fastgen schedule ld3 --model digits-sd --nfe 6`` and ``fastgen schedule dp --model digits-sd
  --nfe 4 6 8`` with the training prompts "a handwritten digit {zero..nine}" and the CLI's default training
  noises (``--seed 0``; LD3 100 noises, DP 128), for each of ``--solvers`` (default dpmpp_2m and unipc,
  both of which ``FastgenScheduler`` replays inside the pipeline). The JSONs are learned
  by the script (subprocess to the CLI) unless ``--schedules DIR`` gives existing ones.
- Diffusers: the pipeline's default scheduler (DDIM) and DPMSolverMultistep, UniPC, Euler, each with and
  without Karras sigmas, all built with ``from_config(pipe.scheduler.config)`` as a user would, run by
  :func:`fastgen.samplers.diffusers_bridge.run_scheduler` on the same (guided) denoiser at the same NFE.

Evaluation: held-out prompts ("the number {d}" / "a drawing of the digit {d}", 20 per class) and held-out
noises (3 seeds of 200), at the card's CFG scale (``--guidance W``: another scale, written to a section of
its own). Error = RMSE of the final latent to the dopri5 reference
ODE solution (``fastgen.core.ode.reference_solve``) from the same noise; FD_digits of the VAE-decoded
images against the digits test split. Means over seeds with 95% Student-t intervals (``mean_ci``).
Run: ``OMP_NUM_THREADS=1 python -m benchmarks.bench_pipeline_schedules`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, markdown_table, write_section
from fastgen.core.ode import reference_solve
from fastgen.metrics.coverage import mean_ci
from fastgen.metrics.digits import digits_fd
from fastgen.models import load_model
from fastgen.samplers.diffusers_bridge import run_scheduler
from fastgen.samplers.guidance import cfg
from fastgen.samplers.schedule import Schedule

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_PROMPTS = [f"a handwritten digit {d}" for d in DIGITS]
HELD_OUT = ("the number {d}", "a drawing of the digit {d}")
CARD_CFG = {"digits-sd": 1.5, "digits-sd3": 1.0}
DIFFUSERS = ("default", "DPMSolverMultistep", "DPMSolverMultistep (Karras)", "UniPCMultistep",
             "UniPCMultistep (Karras)", "EulerDiscrete", "EulerDiscrete (Karras)")
# flow pipelines: Diffusers' multistep solvers in flow mode (flow sigmas do not combine with Karras)
FLOW_DIFFUSERS = ("default", "default (Karras)", "DPMSolverMultistep", "UniPCMultistep")
ALL_DIFFUSERS = DIFFUSERS + FLOW_DIFFUSERS


def learn_cli(model: str, out: Path, nfes: tuple[int, ...], quick: bool, guidance: float = 1.0,
              solvers: tuple[str, ...] = ("dpmpp_2m",)) -> dict[str, Path]:
    """Run ``fastgen schedule ld3`` (NFE 6) and ``fastgen schedule dp`` (all ``nfes``) as a user would, for
    each solver (``--solver``), at the CFG scale the pipeline is sampled with (``--guidance``).
    Files: ``<model>_<method>-<solver>_<nfe>.json``."""
    prompts = [a for p in TRAIN_PROMPTS for a in ("--prompt", p)] + ["--guidance", str(guidance)]
    exe = [sys.executable, "-m", "fastgen.cli"]
    extra_ld3 = ["--num-noise", "8", "--iterations", "3"] if quick else []
    extra_dp = ["--num-noise", "8", "--grid-size", "12"] if quick else []
    for solver in solvers:
        sv = ["--solver", solver]
        subprocess.run(exe + ["schedule", "ld3", "--model", model, "--nfe", "6", "--no-progress", "--out",
                              str(out / f"{model}_ld3-{solver}_6.json")] + sv + extra_ld3 + prompts,
                       check=True, cwd=ROOT)
        subprocess.run(exe + ["schedule", "dp", "--model", model, "--nfe", *map(str, nfes), "--no-progress",
                              "--out", str(out / f"{model}_dp-{solver}_{{nfe}}.json")] + sv + extra_dp + prompts,
                       check=True, cwd=ROOT)
    return find_schedules(model, out)


def find_schedules(model: str, folder: Path) -> dict[str, Path]:
    """``{"ld3-dpmpp_2m@6": path, "dp-ipndm@4": path, ...}`` for the JSONs named ``<model>_<method>_<nfe>.json``."""
    out = {}
    for p in sorted(folder.glob(f"{model}_*_*.json")):
        method, nfe = p.stem[len(model) + 1:].rsplit("_", 1)  # the method may hold "_" (dp-dpmpp_2m)
        out[f"{method}@{nfe}"] = p
    return out


def diffusers_scheduler(name: str, config: dict[str, Any]) -> Any:
    """A Diffusers scheduler built from the pipeline's own scheduler config (``default``: its class)."""
    import diffusers

    if name in ("default", "default (Karras)"):
        kw0 = {"use_karras_sigmas": True} if name.endswith("(Karras)") else {}
        return getattr(diffusers, config["_class_name"]).from_config(config, **kw0)
    if "FlowMatch" in config["_class_name"]:  # multistep solvers in flow mode, the pipeline's shift
        return getattr(diffusers, f"{name}Scheduler").from_config(
            config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config.get("shift", 1.0),
            **({"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "DPMSolverMultistep" else {}))
    base, karras = name.replace(" (Karras)", ""), name.endswith("(Karras)")
    kw: dict[str, Any] = {"use_karras_sigmas": True} if karras else {}
    if base == "DPMSolverMultistep":
        kw.update(algorithm_type="dpmsolver++", solver_order=2)
    return getattr(diffusers, f"{base}Scheduler").from_config(config, **kw)


@torch.no_grad()
def run_flow_pipeline(scheduler: Any, m: Any, noise: torch.Tensor, nfe: int, w: float, cond: dict[str, Any],
                      uncond: dict[str, Any] | None) -> tuple[torch.Tensor, int]:
    """The SD3 pipeline's own loop (latents = noise, ``transformer(x, t)`` velocity, CFG, ``step``).

    Returns the final latent and the number of guided evaluations. Calls the pipeline's network
    directly, as ``StableDiffusion3Pipeline.__call__`` does (fastgen's denoiser is undefined at flow s = 1).
    """
    net = m.info["pipeline"].transformer
    scheduler.set_timesteps(nfe)
    x, calls = noise.clone(), 0
    for t in scheduler.timesteps:
        tt = t.expand(x.shape[0]).to(x.dtype)
        v = net(hidden_states=x, timestep=tt, return_dict=False, **cond)[0]
        if uncond is not None and w != 1.0:
            v = v + (w - 1.0) * (v - net(hidden_states=x, timestep=tt, return_dict=False, **uncond)[0])
        calls += 1
        x = scheduler.step(v, t, x).prev_sample
    return x, calls


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def bench_seed(m: Any, schedules: dict[str, Schedule], nfes: tuple[int, ...], w: float, seed: int,
               per_class: int) -> dict[tuple[str, int], tuple[float, float]]:
    """``{(method, nfe): (rmse, fd)}`` for one held-out noise seed (``10 * per_class`` samples)."""
    n = 10 * per_class
    prompts = [HELD_OUT[i % 2].format(d=DIGITS[i % 10]) for i in range(n)]
    cond, uncond = m.condition(n, prompts=prompts, guidance=w)
    den = cfg(m.denoiser, w, uncond) if w != 1.0 else m.denoiser
    z = torch.randn(n, *m.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = reference_solve(den, z * m.sigma_max, m.sigma_max, **cond)
    out: dict[tuple[str, int], tuple[float, float]] = {("reference", 0): (0.0, digits_fd(m.decode(ref)))}
    for key, sched in schedules.items():
        with torch.no_grad():
            x = sched.sample(den, z, **cond)
        out[(key.split("@")[0], int(key.split("@")[1]))] = (_rmse(x, ref), digits_fd(m.decode(x)))
    sched_cfg = dict(m.config["scheduler"])
    flow = "FlowMatch" in sched_cfg["_class_name"]
    for name in FLOW_DIFFUSERS if flow else DIFFUSERS:
        for nfe in nfes:
            if flow:
                x, calls = run_flow_pipeline(diffusers_scheduler(name, sched_cfg), m, z, nfe, w, cond, uncond)
            else:
                x, calls = run_scheduler(diffusers_scheduler(name, sched_cfg), den, z, nfe, sched_cfg, **cond)
            assert calls == nfe, (name, nfe, calls)
            out[(name, nfe)] = (_rmse(x, ref), digits_fd(m.decode(x)))
    return out


def _ci(vals: list[float]) -> str:
    mu, lo, hi = mean_ci(vals)
    return f"{mu:.4f} [{lo:.4f}, {hi:.4f}]" if mu < 10 else f"{mu:.3f} [{lo:.3f}, {hi:.3f}]"


def report(model: str, runs: list[dict], nfes: tuple[int, ...], w: float) -> tuple[str, dict[str, Any]]:
    """Tables (mean [95% CI] over seeds) and the NFE-wise ratios fastgen / best Diffusers."""
    keys = sorted({k for r in runs for k in r if k[0] != "reference"},
                  key=lambda k: (k[1], k[0] in ALL_DIFFUSERS, k[0]))
    fastgen = sorted({k[0] for k in keys if k[0] not in ALL_DIFFUSERS})
    rows = []
    for k in keys:
        label = k[0] if k[0] in ALL_DIFFUSERS else f"**fastgen {k[0]}**"
        rows.append([k[1], label, _ci([r[k][0] for r in runs]), _ci([r[k][1] for r in runs])])
    text = markdown_table(["NFE", "sampler", "latent RMSE to reference", "FD_digits"], rows)
    ref_fd = _ci([r[("reference", 0)][1] for r in runs])
    text += f"\n\nFD_digits of the decoded reference ODE samples themselves: {ref_fd}.\n\n"
    ref_mean = sum(r[("reference", 0)][1] for r in runs) / len(runs)
    for nfe in nfes:
        df = [k for k in keys if k[1] == nfe and k[0] in ALL_DIFFUSERS]
        best = min(df, key=lambda k: sum(r[k][1] for r in runs))
        text += (f"NFE {nfe}: the exact ODE's FD is {ref_mean / (sum(r[best][1] for r in runs) / len(runs)):.3f}x "
                 f"the best Diffusers FD ({best[0]}): a sampler that converges to the ODE converges to that FD.  \n")
    text += "\n"
    mean = {k: (sum(r[k][0] for r in runs) / len(runs), sum(r[k][1] for r in runs) / len(runs)) for k in keys}
    ratio_rows, verdict = [], {}
    for nfe in nfes:
        df = [k for k in keys if k[1] == nfe and k[0] in ALL_DIFFUSERS]
        best_e, best_f = min(df, key=lambda k: mean[k][0]), min(df, key=lambda k: mean[k][1])
        for meth in fastgen:
            if (meth, nfe) not in mean:
                continue
            e, f = mean[(meth, nfe)]
            d = mean[("default", nfe)]
            ok = e < mean[best_e][0] and f < mean[best_f][1] and e < d[0] and f < d[1]
            verdict[(meth, nfe)] = (ok, f"RMSE {e / mean[best_e][0]:.2f}x the best Diffusers ({best_e[0]}) and "
                                        f"{e / d[0]:.2f}x the default; FD {f / mean[best_f][1]:.2f}x the best "
                                        f"Diffusers ({best_f[0]}) and {f / d[1]:.2f}x the default")
            ratio_rows.append([nfe, meth, f"{e / mean[best_e][0]:.3f} (vs {best_e[0]})",
                               f"{f / mean[best_f][1]:.3f} (vs {best_f[0]})", f"{e / d[0]:.3f}", f"{f / d[1]:.3f}",
                               "yes" if verdict[(meth, nfe)][0] else "**no**"])
    text += ("Ratios of means (fastgen / best Diffusers per metric, and fastgen / pipeline default; < 1 means "
             "fastgen is better):\n\n")
    text += markdown_table(["NFE", "fastgen", "RMSE / best Diffusers", "FD / best Diffusers", "RMSE / default",
                            "FD / default", "beats all on both"], ratio_rows)
    return text, verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test; numbers not meaningful)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-class", type=int, default=50, help="held-out samples per class and seed (default 50)")
    p.add_argument("--schedules", default=None, help="folder with <model>_{ld3,dp}_<nfe>.json from the CLI "
                   "(default: learn them now through the CLI)")
    p.add_argument("--solvers", default="dpmpp_2m,unipc", help="comma-separated fastgen solvers the CLI learns "
                   "DP and LD3 schedules for (any fastgen solver: FastgenScheduler steps them all)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (DiT convention) to learn and sample at, for every model (default: each card's, "
                   f"{CARD_CFG}); a scale other than the card's writes the section pipeline_schedules_<model>_cfg<W>")
    p.add_argument("--models", default="digits-sd", help="comma-separated pipeline sources (digits-sd3 is "
                   "supported but slow on CPU: its CLI DP alone runs > 7 min on 2 shared cores)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    nfes = (4, 6, 8)
    seeds = (1001, 1002, 1003)
    per_class = 2 if args.quick else args.per_class
    solvers = tuple(args.solvers.split(","))
    body = [
        "Does a schedule learned for a shipped pipeline through the CLI beat the pipeline's own schedulers? "
        "fastgen: `fastgen schedule ld3 --model M --nfe 6` and `fastgen schedule dp --model M --nfe 4 6 8`, "
        "each with `--prompt \"a handwritten digit {zero..nine}\"` and the CLI's default training noises "
        "(seed 0; LD3: 100 noises, 150 iterations max, dopri5 teacher; DP: 128 trajectories, 40-interval grid), "
        f"each with `--solver` {' and '.join(f'`{v}`' for v in solvers)} (both replay in the pipeline through "
        "`FastgenScheduler`; every fastgen row is reported, named method-solver), learned at the CFG scale sampled "
        "(`--guidance`, so the schedule fits the guided ODE that is sampled). Diffusers: the "
        "pipeline's default scheduler and DPMSolverMultistep (2M++), UniPC, Euler with and without Karras "
        "sigmas, each `from_config(pipe.scheduler.config)`, driven on the same guided denoiser with "
        "`run_scheduler` (one guided evaluation per step; NFE = guided evaluations for both sides). "
        "Evaluation on held-out prompts (\"the number {d}\" / \"a drawing of the digit {d}\") and held-out "
        f"noises: {len(seeds)} seeds ({', '.join(map(str, seeds))}) x {10 * per_class} samples "
        f"({per_class} per class), at that CFG scale. Error: RMSE of the final latent to the dopri5 "
        "reference ODE solution from the same noise (the default DDIM, with `leading` spacing, starts below "
        "sigma_max and so pays for a different start). FD_digits: decoded images vs the 899 test digits "
        f"({10 * per_class} samples: FD carries a 1/N bias, compare within the table). Values: mean "
        "[95% t-interval] over seeds. Flow pipelines (digits-sd3): the Diffusers side is the pipeline's own loop "
        "(`transformer` velocity, `scheduler.step`) with FlowMatchEuler (default, and with Karras sigmas) "
        "and DPMSolverMultistep / UniPC in flow mode (`use_flow_sigmas`, `prediction_type=flow_prediction`, "
        "the pipeline's shift); the pipeline is loaded fresh each run (it is under-trained and may be replaced).",
    ]
    for model in args.models.split(","):
        t_model = time.perf_counter()
        card_w = CARD_CFG.get(model, 1.0)
        w = card_w if args.guidance is None else args.guidance
        if args.schedules:
            paths = find_schedules(model, Path(args.schedules))
        else:
            tmp = Path(tempfile.mkdtemp(prefix="fastgen-bench-"))
            t0 = time.perf_counter()
            paths = learn_cli(model, tmp, nfes, args.quick, w, solvers)
            print(f"[{model}] CLI schedules learned in {time.perf_counter() - t0:.0f}s: {tmp}", flush=True)
        schedules = {k: Schedule.load(v) for k, v in paths.items()}
        m = load_model(model)
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            runs.append(bench_seed(m, schedules, nfes, w, seed, per_class))
            print(f"[{model}] seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
        text, verdict = report(model, runs, nfes, w)
        at6 = {k: v for k, v in verdict.items() if k[1] == 6}
        by_solver: dict[str, list[bool]] = {}
        for k, v in at6.items():  # "ld3-ipndm" -> "ipndm" (older files without a solver: one group)
            by_solver.setdefault(k[0].partition("-")[2], []).append(v[0])
        held_for = sorted(sv for sv, oks in by_solver.items() if len(oks) >= 2 and all(oks))
        held = bool(held_for)
        claim = ("**The claim HELD**" + (f" (solver {', '.join(held_for)})" if any(held_for) else "")
                 if held else "**The claim did NOT hold**") + (
            f" for {model} at NFE 6 (LD3 and DP of one solver must each beat the default and the best Diffusers "
            f"alternative on both metrics; means over all {len(seeds)} seeds, no seed selection): " +
            "; ".join(f"{k[0]}: {v[1]} ({'beats all' if v[0] else 'does not beat all'})"
                      for k, v in sorted(at6.items())) + ".")
        scale = f"CFG {w}" + ("" if w == card_w else f", the card: {card_w}")
        section = [*body, f"**{model}** ({scale}, schedules: {', '.join(sorted(paths))})\n\n{claim}\n\n{text}",
                   f"Wall time for {model}: {time.perf_counter() - t_model:.0f} s ({args.threads} thread(s), "
                   "a shared 2-core CPU)."]
        if args.quick:  # smoke run: numbers not meaningful, BENCHMARKS.md untouched
            print("\n\n".join(section[1:]))
            continue
        suffix = "" if w == card_w else f"_cfg{w:g}"
        write_section(f"pipeline_schedules_{model}{suffix}",
                      f"Schedules learned through the CLI vs {model}'s own schedulers"
                      + ("" if w == card_w else f" (CFG {w:g})"), "\n\n".join(section),
                      script="bench_pipeline_schedules")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
