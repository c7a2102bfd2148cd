"""The main job as a benchmark: `fastgen demo` (full) on the embedded models, as a BENCHMARKS.md section.

Samples the digits teacher with Diffusers' Euler / DPM-Solver++(2M) / UniPC (Karras sigmas, same model
and noise) and fastgen's samplers and learned schedules at NFE 4-10, Restart vs Heun, the shortcut model
and the one-step student; FD_digits vs the 899 held-out digits. Text-to-image through the shipped
pipelines (digits-sd, digits-sd3): the pipeline's default scheduler vs FastgenScheduler (DPM++2M on the
shipped DP schedule) at NFE 4/6/8 from the same latents, with the latent RMSE to a 30-step reference,
FD_digits of the decoded images and the prompted-class accuracy. Copies the two PNGs to benchmarks/results/.
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
        args = argparse.Namespace(quick=False, device="cpu", out=tmp, num=None, seed=0, no_progress=True,
                                  t2i_num=None, no_pipelines=False)
        demo.run(args)
        res = json.loads((Path(tmp) / "results.json").read_text())
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "samples.png", RESULTS / "demo_samples.png")
        shutil.copy(Path(tmp) / "nfe_vs_fd.png", RESULTS / "demo_nfe_vs_fd.png")
    rows = [r for r in res["rows"] if not r.get("pipeline")]
    t2i = [r for r in res["rows"] if r.get("pipeline")]
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
    t2i_table = markdown_table(
        ["pipeline", "sampler", "NFE", "latent RMSE to reference", "FD_digits", "prompted-class accuracy", "seconds"],
        [[r["pipeline"], r["method"].split(": ", 1)[1], f"{r['nfe']:g}", r["rmse"], r["fd"], r["accuracy"],
          r["seconds"]] for r in t2i])
    t2i_ratios = []
    for r in t2i:
        if r["family"].endswith("fastgen DP"):
            d = next(x for x in t2i if x["pipeline"] == r["pipeline"] and x["nfe"] == r["nfe"]
                     and x["family"].endswith(" default"))
            t2i_ratios.append([r["pipeline"], f"{r['nfe']:g}", d["rmse"], r["rmse"], r["rmse"] / d["rmse"],
                               d["fd"], r["fd"]])
    t2i_ratio_table = markdown_table(["pipeline", "NFE", "default RMSE", "fastgen DP RMSE", "ratio", "default FD",
                                      "fastgen DP FD"], t2i_ratios)
    n_t2i = len(t2i)
    body = f"""
{res['num_samples']} class-balanced samples per method (seed 0, the same noise for every method), FD on the
digits classifier's features against the 899 held-out digits; the real train split gives
FD {res['real_fd']:.3f} at the same n. Diffusers' schedulers run on the same teacher through
`fastgen.samplers.diffusers_bridge` (a VP table spanning the teacher's sigma range). Total time
{res['total_seconds']:.0f} s (seconds are wall time on a shared machine that other jobs may load:
compare them within one run only).

{table}

Best at equal NFE (lower ratio is better for fastgen):

{ratio_table}

Text-to-image through the shipped pipelines ({'none run' if not n_t2i else 'seed 0, 200 prompts per row'}):
"a handwritten digit {{zero..nine}}" cycled, one seeded latent per prompt, the model card's CFG scale
(digits-sd 1.5, digits-sd3 1.0), run by the pipeline itself (`pipe(prompts, latents=z, output_type="latent")`)
with its default scheduler (DDIM / FlowMatchEuler) and with `FastgenScheduler` (DPM-Solver++(2M) on the DP
schedule shipped for the pipeline, learned by `scripts/make_pipeline_schedules.sh`, or on Karras sigmas).
Latent RMSE is to the reference row (DPM++2M, 30 log-linear steps, same pipeline and latents); FD_digits
of the VAE-decoded images vs the held-out digits (at 200 samples: compare within the table).

{t2i_table}

fastgen's DP schedule vs the pipeline's default scheduler at equal NFE:

{t2i_ratio_table}

![samples](benchmarks/results/demo_samples.png)
![NFE vs FD](benchmarks/results/demo_nfe_vs_fd.png)
"""
    write_section("demo", "Digits teacher and digits pipelines: fastgen vs Diffusers schedulers at equal NFE "
                  "(`fastgen demo`)", body)


if __name__ == "__main__":
    main()
