"""InstaFlow on the digits text-to-image pipeline: does reflow straighten digits-sd so that few-step Euler works?

Models (all through ``fastgen.models.load_model``), prompts "a handwritten digit <class>", 100 samples per class,
noise ``torch.Generator().manual_seed(1000 * seed + class)``, seeds 0, 1, 2; FD_digits of the VAE-decoded
images against the digits test split and the digits classifier's accuracy on the prompted class (the teacher
card's protocol, :mod:`benchmarks.bench_distill_pipelines`):

- ``digits-sd`` (teacher, CFG 1.5 against the empty prompt, its card's scale): rectified-flow Euler (fastgen's
  ``euler`` on the grid uniform in rectified-flow t from ``sigma_max``) at 1, 2, 4 and 25 steps;
- the 2-rectified flow (``fastgen distill digits-sd-instaflow-2rf``; guidance 1, CFG is in its coupling) at the
  same steps;
- the one-step InstaFlow student (``fastgen distill digits-sd-instaflow``) at 1 step; and the shipped f-distill
  student ``digits-sd-fdistill-js`` (1 step) for comparison.

Straightness ``S`` (:func:`fastgen.train.reflow_pairs.straightness`, 100 Euler steps, 300 noises, normalised
by the chord) of the teacher's guided flow and of the 2-RF. Claim (reflow card): reflow straightens the paths,
so few-step Euler improves sharply; held when the 2-RF's FD is below the teacher's at 1, 2 and 4 steps with
disjoint intervals. Run: ``OMP_NUM_THREADS=1 python -m benchmarks.bench_instaflow --runs RUNS_DIR`` (RUNS_DIR
holds the two runs; ``--quick``: 10 samples per class, no BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_distill_pipelines import DIGITS, score, student_samples
from benchmarks.common import markdown_table, write_section
from fastgen.core.solvers import euler
from fastgen.metrics.coverage import mean_ci
from fastgen.models import load_model
from fastgen.samplers.guidance import CFGDenoiser
from fastgen.train.reflow_pairs import rf_uniform_sigmas, straightness

SEEDS = (0, 1, 2)
STEPS = (1, 2, 4, 25)


def guided(model: Any, w: float) -> Any:
    null, _ = model.condition(1, prompts=[""])
    return CFGDenoiser(model.denoiser, w, uncond=null)


def euler_samples(model: Any, w: float, steps: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded images (10 * per_class, 1, 8, 8) of rectified-flow Euler with ``steps`` steps at CFG ``w``."""
    den = guided(model, w)
    sigmas = rf_uniform_sigmas(steps, model.sigma_max)
    xs = []
    for c, d in enumerate(DIGITS):
        cond, _ = model.condition(per_class, prompts=[f"a handwritten digit {d}"])
        z = torch.randn((per_class, *model.shape), generator=torch.Generator().manual_seed(1000 * seed + c))
        with torch.no_grad():
            xs.append(model.decode(euler(den, z * model.sigma_max, sigmas, **cond)))
    return torch.cat(xs), torch.arange(10).repeat_interleave(per_class)


def straight(model: Any, w: float, n: int = 300) -> float:
    z = torch.randn((n, *model.shape), generator=torch.Generator().manual_seed(777))
    cond, _ = model.condition(n, prompts=[f"a handwritten digit {DIGITS[i % 10]}" for i in range(n)])
    return straightness(guided(model, w), z, steps=100, sigma_max=model.sigma_max, **cond)["S_normalized"]


def over_seeds(fn: Any) -> dict[str, tuple[float, float, float]]:
    runs = [score(*fn(s)) for s in SEEDS]
    return {"fd": mean_ci([r["fd"] for r in runs]), "accuracy": mean_ci([r["accuracy"] for r in runs]),
            "fd_seeds": [r["fd"] for r in runs]}


def train_seconds(run: Path) -> float:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1])["wall_s"])


def _ci(v: tuple[float, float, float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs", help="folder holding digits-sd-instaflow-2rf/ and digits-sd-instaflow/")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    per = 10 if args.quick else 100
    runs = Path(args.runs)
    t0 = time.perf_counter()
    teacher, rf2 = load_model("digits-sd"), load_model(runs / "digits-sd-instaflow-2rf")
    one = load_model(runs / "digits-sd-instaflow")  # its one-step student (student.json, fastgen distill)
    res: dict[str, Any] = {"teacher": {}, "2rf": {}}
    for k in STEPS:
        res["teacher"][k] = over_seeds(lambda s, k=k: euler_samples(teacher, 1.5, k, per, s))
        res["2rf"][k] = over_seeds(lambda s, k=k: euler_samples(rf2, 1.0, k, per, s))
    res["instaflow"] = over_seeds(lambda s: student_samples(one, per, s))  # == one RF Euler step of its pipeline
    fdistill = load_model("digits-sd-fdistill-js")
    res["fdistill"] = over_seeds(lambda s: student_samples(fdistill, per, s))
    res["S"] = {"teacher": straight(teacher, 1.5, 60 if args.quick else 300),
                "2rf": straight(rf2, 1.0, 60 if args.quick else 300)}
    rows = []
    for k in STEPS:
        t, r = res["teacher"][k], res["2rf"][k]
        better = r["fd"][2] < t["fd"][1]
        rows.append([k, _ci(t["fd"]), _ci(t["accuracy"]), _ci(r["fd"]), _ci(r["accuracy"]),
                     f"{r['fd'][0] / t['fd'][0]:.2f}x", "yes" if better else "no"])
    table = markdown_table(["Euler steps", "digits-sd (CFG 1.5) FD", "accuracy", "2-RF (guidance 1) FD", "accuracy",
                            "2-RF / teacher FD", "2-RF better (disjoint 95% CI)"], rows)
    sig = {k: res["2rf"][k]["fd"][2] < res["teacher"][k]["fd"][1] for k in (1, 2, 4)}
    held = all(sig.values())
    per_step = ", ".join(f"{k} step(s): {res['2rf'][k]['fd'][0] / res['teacher'][k]['fd'][0]:.2f}x "
                         f"({'disjoint intervals' if sig[k] else 'intervals overlap'})" for k in (1, 2, 4))
    t2, t1 = train_seconds(runs / "digits-sd-instaflow-2rf"), train_seconds(runs / "digits-sd-instaflow")
    one_rows = [["InstaFlow one-step (`digits-sd-instaflow`)", 1, _ci(res["instaflow"]["fd"]),
                 _ci(res["instaflow"]["accuracy"]), f"{t2 + t1:.0f} s training + 2 x 12000 coupling pairs"],
                ["f-distill JS student (`digits-sd-fdistill-js`)", 1, _ci(res["fdistill"]["fd"]),
                 _ci(res["fdistill"]["accuracy"]), "see its card"],
                ["digits-sd, 25 Euler steps (CFG 1.5)", 50, _ci(res["teacher"][25]["fd"]),
                 _ci(res["teacher"][25]["accuracy"]), "-"]]
    body = (
        f"{per} samples per class from \"a handwritten digit <class>\", VAE-decoded; FD_digits vs the digits test "
        "split; accuracy of the digits classifier on the prompted class; means over noise seeds 0, 1, 2 with 95% "
        "Student-t intervals (one training run, seed 0, per model: the intervals are over sampling noise). "
        "Rectified-flow Euler on the grid uniform in t from the teacher's sigma_max 14.6. Runs: `fastgen distill "
        "digits-sd-instaflow-2rf` (12000 CFG-1.5 Heun-16 couplings, 2000 steps, batch 64), then `fastgen distill "
        "digits-sd-instaflow` (12000 couplings of the 2-RF, t fixed at the start, L2, 1500 steps).\n\n"
        + table
        + f"\n\nStraightness S / E||chord||^2 (100 Euler steps, 300 noises): digits-sd guided flow "
        f"**{res['S']['teacher']:.4f}**, 2-RF **{res['S']['2rf']:.4f}** "
        f"({res['S']['2rf'] / res['S']['teacher']:.2f}x).\n\n"
        + markdown_table(["one-step model", "NFE", "FD_digits", "accuracy", "training cost (CPU, 1 thread)"], one_rows)
        + f"\n\n**Claim (reflow straightens paths, so few-step Euler improves sharply): "
        f"{'HELD' if held else 'NOT HELD at every step count'}** on digits-sd: 2-RF FD / teacher FD at "
        f"{per_step}. "
        f"Training wall time: 2-RF {t2:.0f} s, one-step {t1:.0f} s (coupling generation not included). "
        f"Measured in {time.perf_counter() - t0:.0f} s."
    )
    print(body)
    (Path(args.runs) / "bench_instaflow.json").write_text(json.dumps(res, indent=1, default=str))
    if not args.quick:
        write_section("instaflow", "InstaFlow: reflow of the digits-sd text-to-image pipeline (1/2/4-step Euler)", body)


if __name__ == "__main__":
    main()
