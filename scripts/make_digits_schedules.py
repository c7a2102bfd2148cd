"""Learn the schedules shipped for the embedded digits teacher (used by `fastgen demo` / `--schedule ays|ld3|dp`).

Writes fastgen/models/weights/schedules/digits-edm/{ays,ld3,dp}-<solver>-nfe<N>.json.
Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/make_digits_schedules.py [--solver dpmpp_2m] [--nfes 4 6 8 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastgen.data import load_digits_split
from fastgen.models import load_model
from fastgen.samplers.ays import for_solver, optimize_ays
from fastgen.samplers.dp import dp_schedules
from fastgen.samplers.ld3 import learn_ld3

OUT = Path(__file__).resolve().parent.parent / "fastgen" / "models" / "weights" / "schedules" / "digits-edm"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--nfes", type=int, nargs="+", default=[4, 6, 8, 10])
    p.add_argument("--methods", nargs="+", default=["dp", "ays", "ld3"])
    args = p.parse_args()
    torch.manual_seed(0)
    den = load_model("digits-edm").denoiser
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(400, 1, 8, 8, generator=g)
    labels = torch.arange(400) % 10
    if "dp" in args.methods:
        t0 = time.perf_counter()
        res = dp_schedules(den, noise[:200], args.nfes, solver=args.solver, class_labels=labels[:200],
                           model_id="digits-edm")
        for k, s in res.items():
            s.save(OUT / f"dp-{args.solver}-nfe{k}.json")
        print(f"dp: {time.perf_counter() - t0:.1f}s", flush=True)
    data = load_digits_split("train")
    for k in args.nfes:
        if "ays" in args.methods:
            t0 = time.perf_counter()
            s = optimize_ays(den, data.images, class_labels=data.labels, solver=args.solver, nfe=k, val_noise=128,
                             generator=torch.Generator().manual_seed(k), model_id="digits-edm", progress=False)
            for_solver(s, args.solver, k).save(OUT / f"ays-{args.solver}-nfe{k}.json")
            print(f"ays nfe {k}: {time.perf_counter() - t0:.1f}s", flush=True)
        if "ld3" in args.methods:
            t0 = time.perf_counter()
            s = learn_ld3(den, noise, solver=args.solver, nfe=k, class_labels=labels,
                          generator=torch.Generator().manual_seed(k), model_id="digits-edm", progress=False)
            s.save(OUT / f"ld3-{args.solver}-nfe{k}.json")
            print(f"ld3 nfe {k}: {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
