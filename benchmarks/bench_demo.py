"""The main job as a benchmark: `fastgen demo` (full) on the embedded models, as a BENCHMARKS.md section.

Samples the digits teacher with Diffusers' Euler / DPM-Solver++(2M) / UniPC (Karras sigmas, same model
and noise) and fastgen's samplers and learned schedules at NFE 4-10, Restart vs Heun, the shortcut model
and the one-step student; FD_digits vs the 899 held-out digits. Copies the two PNGs to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table, write_section


def main() -> None:
    from fastgen.commands import demo

    with tempfile.TemporaryDirectory() as tmp:
        args = argparse.Namespace(quick=False, device="cpu", out=tmp, num=None, seed=0, no_progress=True)
        demo.run(args)
        res = json.loads((Path(tmp) / "results.json").read_text())
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "samples.png", RESULTS / "demo_samples.png")
        shutil.copy(Path(tmp) / "nfe_vs_fd.png", RESULTS / "demo_nfe_vs_fd.png")
    rows = res["rows"]
    by_nfe: dict[float, list[dict]] = {}
    for r in rows:
        by_nfe.setdefault(r["nfe"], []).append(r)
    table = markdown_table(
        ["method", "NFE", "FD_digits", "seconds"],
        [[r["method"], f"{r['nfe']:g}", r["fd"], r["seconds"]] for r in rows],
    )
    ratios = []
    for nfe, group in sorted(by_nfe.items()):
        diff = [r for r in group if r["method"].startswith("Diffusers") and "Euler" not in r["method"]]
        ours = [r for r in group if r["method"].startswith("fastgen")]
        if diff and ours:
            best_d = min(diff, key=lambda r: r["fd"])
            best_f = min(ours, key=lambda r: r["fd"])
            ratios.append([f"{nfe:g}", best_d["method"], best_d["fd"], best_f["method"], best_f["fd"],
                           best_f["fd"] / best_d["fd"]])
    ratio_table = markdown_table(
        ["NFE", "best Diffusers", "FD", "best fastgen", "FD", "fastgen / Diffusers"], ratios)
    body = f"""
{res['num_samples']} class-balanced samples per method (seed 0, the same noise for every method), FD on the
digits classifier's features against the 899 held-out digits; the real train split gives
FD {res['real_fd']:.3f} at the same n. Diffusers' schedulers run on the same teacher through
`fastgen.samplers.diffusers_bridge` (a VP table spanning the teacher's sigma range). Total time
{res['total_seconds']:.0f} s.

{table}

Best at equal NFE (lower ratio is better for fastgen):

{ratio_table}

![samples](benchmarks/results/demo_samples.png)
![NFE vs FD](benchmarks/results/demo_nfe_vs_fd.png)
"""
    write_section("demo", "Digits teacher: fastgen vs Diffusers schedulers at equal NFE (`fastgen demo`)", body)


if __name__ == "__main__":
    main()
