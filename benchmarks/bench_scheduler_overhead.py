"""Scheduler overhead: time per network call spent in ``scale_model_input`` + ``step`` (model excluded).

fastgen's ``RestartScheduler`` / ``FastgenScheduler`` against Diffusers' ``EulerDiscreteScheduler``
(and ``HeunDiscreteScheduler`` for the two-stage solvers), on an SD-1.5 scheduler config and SD-sized
latents, measured in the same run and reported as ratios. Target: <= 1.2x Euler.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, write_section  # noqa: E402

SD_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 1,
    "_class_name": "PNDMScheduler",
}


def time_loop(sched, shape: tuple[int, ...], steps: int) -> tuple[float, int]:
    """Microseconds per call of scale_model_input + step over one full loop; and the number of calls."""
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(shape, generator=g)
    kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
    sched.set_timesteps(steps)
    x = torch.randn(shape, generator=g) * float(sched.init_noise_sigma)
    calls = len(sched.timesteps)
    t0 = time.perf_counter()
    for t in sched.timesteps:
        sched.scale_model_input(x, t)
        x = sched.step(eps, t, x, **kw).prev_sample
    return (time.perf_counter() - t0) / calls * 1e6, calls


def main() -> None:
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    from fastgen.samplers import FastgenScheduler, RestartScheduler

    torch.set_num_threads(1)
    steps, repeats = 30, 31
    contenders = {
        "Diffusers EulerDiscrete (karras)": lambda: EulerDiscreteScheduler.from_config(
            SD_CONFIG, use_karras_sigmas=True),
        "Diffusers HeunDiscrete (karras)": lambda: HeunDiscreteScheduler.from_config(
            SD_CONFIG, use_karras_sigmas=True),
        "FastgenScheduler euler/karras": lambda: FastgenScheduler.from_config(SD_CONFIG, solver="euler"),
        "FastgenScheduler heun/karras": lambda: FastgenScheduler.from_config(SD_CONFIG, solver="heun"),
        "FastgenScheduler dpmpp_2m/karras": lambda: FastgenScheduler.from_config(SD_CONFIG, solver="dpmpp_2m"),
        "FastgenScheduler ipndm/karras": lambda: FastgenScheduler.from_config(SD_CONFIG, solver="ipndm"),
        "RestartScheduler auto (A1111)": lambda: RestartScheduler.from_config(SD_CONFIG),
        "RestartScheduler auto, VP state": lambda: RestartScheduler.from_config(SD_CONFIG, state_space="vp"),
    }
    body = [
        f"Microseconds per network call spent in `scale_model_input` + `step` (no model), {steps} inference "
        f"steps, SD-1.5 config, {repeats} interleaved repeats, 1 thread. 'x Euler (min)' = best-of-repeats "
        "time / EulerDiscrete's best-of-repeats time (the usual microbenchmark statistic: the intrinsic "
        "cost); 'paired median' = median over repeats of the ratio within one repeat. Heun-type schedulers "
        "are also compared with Diffusers' HeunDiscrete. The machine is shared by several jobs (load "
        "average > 10 on 2 cores), so medians are noisy, large latents (page faults) most of all.\n",
    ]
    worst = 0.0
    for shape in [(1, 4, 64, 64), (4, 4, 64, 64), (1, 4, 16, 16)]:
        scheds = {name: make() for name, make in contenders.items()}
        times: dict[str, list[float]] = {name: [] for name in scheds}
        calls: dict[str, int] = {}
        for _ in range(repeats):  # interleaved: each repeat times every scheduler back to back
            for name, sched in scheds.items():
                us, calls[name] = time_loop(sched, shape, steps)
                times[name].append(us)
        euler, heun = times["Diffusers EulerDiscrete (karras)"], times["Diffusers HeunDiscrete (karras)"]
        rows = []
        for name, ts in times.items():
            paired = statistics.median(t / e for t, e in zip(ts, euler))  # same repeat
            rows.append([name, calls[name], min(ts), statistics.median(ts), min(ts) / min(euler),
                         min(ts) / min(heun), paired])
            if name.startswith("Fastgen") or name.startswith("Restart"):
                worst = max(worst, min(ts) / min(euler))
        body += [f"### latents {tuple(shape)}\n",
                 markdown_table(["scheduler", "calls", "min us / call", "median us / call", "x Euler (min)",
                                "x Heun (min)", "x Euler (paired median)"], rows), ""]
    body.append(f"Worst fastgen best-of ratio to Euler over all shapes: **{worst:.2f}x** (target <= 1.2x).")
    write_section("scheduler_overhead", "Scheduler overhead per step (model excluded)", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
