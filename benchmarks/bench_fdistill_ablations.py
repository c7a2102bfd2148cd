"""Where does the one-step student lose its teacher's modes? f-distill ablations (issue 17, item 2).

Each variant is the shipped config (``fastgen/configs/distill/digits-js.yaml`` or ``ring-js.yaml``) with
``--set`` overrides, trained by fastgen's own :class:`~fastgen.train.Trainer` for a short budget and
scored on the EMA student:

- **digits** (``digits-edm`` teacher, Heun 35 NFE on the Karras 18-step grid): FD_digits to the 899
  held-out digits, FD_digits to the teacher's own samples, k-NN precision/recall (k=3, pixels)
  against the held-out data and against the teacher's samples, within-class diversity; all on the
  same class-cycled noise the teacher used (``bench_student_coverage``'s protocol, 899 samples);
- **ring** (exact 8-mode imbalanced mixture): mode-weight TV, modes covered, precision (within 3 std).

Run-level results are cached as JSON under ``benchmarks/results/fdistill_ablations/`` (one file per
variant, seed and budget), so variants can be run one at a time and the report assembled at the end::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_fdistill_ablations --variants base80,ssig1.5 \\
        --seeds 0 --steps 2000
    python -m benchmarks.bench_fdistill_ablations --report      # writes the BENCHMARKS.md section

Every table cell is a mean over seeds with a 95% t-interval (:func:`fastgen.metrics.coverage.mean_ci`),
never the best seed; a single-seed screening row says so (n = 1, no interval).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, markdown_table, write_section
from fastgen.metrics.coverage import class_diversity, fd_between, knn_precision_recall, mean_ci

CACHE = RESULTS / "fdistill_ablations"
CONFIGS = {"digits": "digits-js", "ring": "ring-js"}
NUM = 899  # class-cycled digits samples per seed (as bench_student_coverage)

#: name -> (bed, what it changes, --set overrides on top of the bed's shipped config)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    # ---- digits: one knob at a time from the previous default (student sigma 80)
    "base80": ("digits", "previous default (student at sigma 80)", ["method.student_sigma=80.0"]),
    "ssig10": ("digits", "student sigma 10", ["method.student_sigma=10.0"]),
    "ssig2.5": ("digits", "student sigma 2.5 (SiD/Uni-Instruct)", ["method.student_sigma=2.5"]),
    "ssig1.5": ("digits", "student sigma 1.5", ["method.student_sigma=1.5"]),
    "ssig1.0": ("digits", "student sigma 1.0", ["method.student_sigma=1.0"]),
    "gan0": ("digits", "lambda_G 0 (no generator GAN term)", ["method.student_sigma=80.0", "method.lambda_gan=0.0"]),
    "gan1e-2": ("digits", "lambda_G 1e-2", ["method.student_sigma=80.0", "method.lambda_gan=0.01"]),
    "rkl80": ("digits", "reverse-KL (h = 1)", ["method.student_sigma=80.0", "method.divergence=reverse_kl"]),
    "fkl80": ("digits", "forward-KL", ["method.student_sigma=80.0", "method.divergence=forward_kl"]),
    "every2": ("digits", "student every 2nd step", ["method.student_sigma=80.0", "method.student_every=2",
                                                     "ema.every=2"]),
    "critlr2e-3": ("digits", "critic lr 2e-3 (4x)", ["method.student_sigma=80.0",
                                                     "optim.groups={critic: {lr: 0.002}}"]),
    "bins1": ("digits", "1 ratio bin", ["method.student_sigma=80.0", "method.ratio_bins=1"]),
    "clip0.5": ("digits", "ratio clip [0.5, 20] (h at small r)", ["method.student_sigma=80.0",
                                                                   "method.ratio_clip=[0.5, 20.0]"]),
    "tmax10": ("digits", "sigma <= 10 for the DMD/critic draws", ["method.student_sigma=80.0",
                                                                  "method.t_index_hi=669"]),
    "ema0.9": ("digits", "EMA 0.9 per student update", ["method.student_sigma=80.0", "ema.decay=0.9"]),
    # ---- from the new default (student sigma 2.5)
    "s2.5-linbins": ("digits", "sigma 2.5 + FastGen's raw-sigma ratio bins", ["method.student_sigma=2.5",
                                                                            "method.ratio_bin_space=linear"]),
    "s2.5-fkl": ("digits", "sigma 2.5 + forward-KL", ["method.student_sigma=2.5", "method.divergence=forward_kl"]),
    "s2.5-rkl": ("digits", "sigma 2.5 + reverse-KL", ["method.student_sigma=2.5", "method.divergence=reverse_kl"]),
    "s2.5-ui": ("digits", "sigma 2.5 + Uni-Instruct (JS, exact DI)", ["method.student_sigma=2.5",
                                                                     "method.name=uni_instruct"]),
    # ---- DMD's regression loss (teacher ODE from the student's own noise), from the sigma-2.5 default
    **{f"s2.5-reg{w:g}": ("digits", f"sigma 2.5 + regression weight {w:g}",
                          ["method.student_sigma=2.5", f"method.regression_weight={w}"])
       for w in (0.25, 1.0, 4.0, 16.0)},
    **{f"ring-js-reg{w:g}": ("ring", f"f-distill JS + regression weight {w:g}",
                             [f"method.regression_weight={w}"]) for w in (0.25, 1.0, 4.0)},
    "s2.5-reg4-gan0.03": ("digits", "sigma 2.5 + regression weight 4 + lambda_G 0.03",
                          ["method.student_sigma=2.5", "method.regression_weight=4.0", "method.lambda_gan=0.03"]),
    # ---- the within-class contraction (every variant above: 0.81-0.90x the teacher's spread): student updates
    "s2.5-reg4-every1": ("digits", "sigma 2.5 + regression 4 + the student every step (5x the student updates)",
                         ["method.student_sigma=2.5", "method.regression_weight=4.0", "method.student_every=1",
                          "ema.every=1"]),
    "s2.5-reg4-every1-unipc10": ("digits", "sigma 2.5 + regression 4 + the student every step + its ODE by UniPC "
                                 "on 10 Karras sigmas (10 calls, not 35)",
                                 ["method.student_sigma=2.5", "method.regression_weight=4.0", "method.student_every=1",
                                  "ema.every=1", "method.regression_solver=unipc", "method.regression_grid=10"]),
    **{f"s2.5-reg4-slr{lr:g}": ("digits", f"sigma 2.5 + regression 4 + student lr {lr:g} ({lr / 5e-4:g}x)",
                                ["method.student_sigma=2.5", "method.regression_weight=4.0",
                                 f"optim.groups={{student: {{lr: {lr}}}}}"])
       for lr in (0.002, 0.00025, 0.000125)},
    "ring-js-reg4-every1": ("ring", "f-distill JS + regression weight 4 + the student every step (2x the updates)",
                            ["method.regression_weight=4.0", "method.student_every=1", "ema.every=1"]),
    "ring-js-reg4-anneal3k": ("ring", "f-distill JS + regression weight 4 decayed to 0 at step 3000",
                              ["method.regression_weight=4.0", "method.regression_anneal_steps=3000"]),
}

#: Paired comparisons the report computes (same seeds, same budget): (bed, variant, against, iterations, metrics).
PAIRED = [
    ("digits", "s2.5-reg4-every1-unipc10", "s2.5-reg4", 6000,
     ("fd_data_ratio", "rec_ratio", "prec_ratio", "div_ratio")),
    ("ring", "ring-js-reg4-every1", "ring-js-fdreg", 1000, ("tv", "knn_precision", "knn_recall", "fd_data")),
]

#: The equal-budget table (issue 17): divergence x {f-distill, Uni-Instruct} on the ring, same iterations.
TABLE_DIVS = {"reverse_kl": "reverse-KL", "js": "JS", "forward_kl": "forward-KL", "hellinger": "Hellinger",
              "alpha:1.5": "alpha = 1.5"}
#: method key -> (label, overrides); the regression weight is explicit, whatever the config's default.
TABLE_METHODS = {
    "fd": ("f-distill", ["method.name=fdistill", "method.regression_weight=0.0"]),
    "ui": ("Uni-Instruct", ["method.name=uni_instruct", "method.regression_weight=0.0"]),
    "fdreg": ("f-distill + regression 4", ["method.name=fdistill", "method.regression_weight=4.0"]),
}
for _d, _dn in TABLE_DIVS.items():
    for _m, (_mn, _over) in TABLE_METHODS.items():
        VARIANTS[f"ring-{_d.replace(':', '')}-{_m}"] = ("ring", f"{_mn}, {_dn}", [*_over, f"method.divergence={_d}"])
VARIANTS["ring-linbins"] = ("ring", "f-distill JS + FastGen's raw-sigma ratio bins", ["method.ratio_bin_space=linear"])
# The configs' default turned DMD's regression on after these variants were measured: each one not about the
# regression states its weight 0, so a variant means what its cached runs measured.
for _name, (_bed, _what, _extra) in list(VARIANTS.items()):
    if not any(o.startswith("method.regression_weight=") for o in _extra):
        VARIANTS[_name] = (_bed, _what, [*_extra, "method.regression_weight=0.0"])
# Likewise the digits configs' student schedule and regression ODE (the student every step, UniPC on 10 sigmas
# since the s2.5-reg4-every1-unipc10 runs): the variants measured before state the old ones (every 5th step,
# Heun on 18 sigmas).
_OLD_DIGITS = {"method.student_every": "5", "ema.every": "5", "method.regression_solver": "heun",
               "method.regression_grid": "18"}
for _name, (_bed, _what, _extra) in list(VARIANTS.items()):
    if _bed == "digits":
        _set = {o.split("=", 1)[0] for o in _extra}
        VARIANTS[_name] = (_bed, _what, [*_extra, *(f"{k}={v}" for k, v in _OLD_DIGITS.items() if k not in _set)])


def _overrides(bed: str, extra: list[str], seed: int, steps: int, out: Path) -> list[str]:
    return [f"seed={seed}", f"steps={steps}", f"output_dir={out}", "checkpoint_every=1000000000",
            "progress=false", f"log_every={max(steps // 4, 1)}", *extra]


def train_variant(bed: str, extra: list[str], seed: int, steps: int):
    """Train one variant; returns ``(ema student, method, minutes)``."""
    import tempfile

    import fastgen.distill  # noqa: F401  (registers the fdistill method)
    from fastgen.commands._configs import resolve_config
    from fastgen.train import Trainer, load_config

    with tempfile.TemporaryDirectory(prefix="fdistill-abl-") as tmp:
        cfg = load_config(resolve_config(CONFIGS[bed], "distill"), _overrides(bed, extra, seed, steps, Path(tmp)))
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        trainer.train()
        minutes = (time.perf_counter() - t0) / 60
        return trainer.ema_network("student").eval(), trainer.method, minutes


# ---------------------------------------------------------------------------------------------- digits
def _noise(seed: int) -> torch.Tensor:
    return torch.randn(NUM, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def teacher_reference(seed: int) -> dict[str, torch.Tensor]:
    """The teacher's samples (Heun 35 NFE) on noise ``seed`` and, for the floor, on ``seed + 10_000``."""
    path = CACHE / f"teacher_digits_s{seed}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from fastgen.core import solvers
    from fastgen.core.schedules import karras
    from fastgen.models import load_model

    den = load_model("digits-edm").denoiser
    labels = torch.arange(NUM) % 10
    sig = karras(18, 0.002, 80.0)
    with torch.no_grad():
        ref = {k: solvers.heun(den, _noise(s) * 80.0, sig, class_labels=labels).clamp(-1, 1)
               for k, s in (("x", seed), ("x2", seed + 10_000))}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    return ref


def digits_metrics(x: torch.Tensor, seed: int) -> dict[str, float]:
    """Student metrics on its samples ``x`` (NUM, 1, 8, 8), next to the teacher's on the same noise.

    The "vs teacher" entries compare ``x`` with the teacher's samples from that same noise, the protocol of
    every cached run (kept so that the cache stays comparable). That flatters a student trained with the
    regression loss, which tracks the teacher sample by sample; ``bench_student_coverage`` draws the student's
    noise independently for the shipped student."""
    from fastgen.data import load_digits_split

    data = load_digits_split("test").images
    ref = teacher_reference(seed)
    out: dict[str, float] = {}
    for who, s in (("student", x), ("teacher", ref["x"])):
        pr = knn_precision_recall(s, data, k=3)
        out[f"fd_data_{who}"] = fd_between(s, data, "digits")
        out[f"prec_{who}"], out[f"rec_{who}"] = pr["precision"], pr["recall"]
        out[f"div_{who}"] = class_diversity(s)["diversity"]
    pr = knn_precision_recall(x, ref["x"], k=3)
    out["fd_teacher"] = fd_between(x, ref["x"], "digits")
    out["fd_teacher_floor"] = fd_between(ref["x2"], ref["x"], "digits")
    out["prec_vs_teacher"], out["rec_vs_teacher"] = pr["precision"], pr["recall"]
    for k in ("fd_data", "prec", "rec", "div"):
        out[f"{k}_ratio"] = out[f"{k}_student"] / out[f"{k}_teacher"]
    return out


INIT_SIGMAS = (80.0, 10.0, 5.0, 2.5, 1.5, 1.0)


def init_table(seed: int = 0) -> str:
    """The untrained student ``x = D_teacher(sigma z, sigma)`` (a teacher copy, step 0) per student sigma:
    how much of the teacher's within-class diversity and coverage it starts with."""
    from fastgen.models import load_model

    den = load_model("digits-edm").denoiser
    labels = torch.arange(NUM) % 10
    rows = []
    for s in INIT_SIGMAS:
        with torch.no_grad():
            x = den(_noise(seed) * s, torch.full((NUM,), s), class_labels=labels).clamp(-1, 1)
        m = digits_metrics(x, seed)
        rows.append([f"{s:g}", f"{m['div_ratio']:.2f}", f"{m['rec_vs_teacher']:.3f}", f"{m['fd_data_student']:.2f}"])
    return markdown_table(["student sigma", "within-class diversity / teacher", "recall vs teacher samples",
                           "FD_digits to data"], rows)


def digits_eval(student, seed: int) -> dict[str, float]:
    labels = torch.arange(NUM) % 10
    dev = next(student.parameters()).device
    with torch.no_grad():
        x = student(_noise(seed).to(dev), labels.to(dev)).cpu().clamp(-1, 1)
    return digits_metrics(x, seed)


# ---------------------------------------------------------------------------------------------- ring
def ring_metrics(x: torch.Tensor) -> dict[str, float]:
    from benchmarks.bench_fdistill import mode_metrics
    from fastgen.data.toy import ring_mixture

    return mode_metrics(x, ring_mixture(weights="imbalanced"))


def ring_teacher(seed: int) -> torch.Tensor:
    """The exact teacher sampled with Heun at 35 NFE (Karras grid on [0.02, 10]), 4000 samples."""
    from fastgen.core import solvers
    from fastgen.core.schedules import karras
    from fastgen.data.toy import ring_mixture

    gm = ring_mixture(weights="imbalanced")
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(3000 + seed)).double()
    with torch.no_grad():
        return solvers.heun(gm.denoiser(), z * 10.0, karras(18, 0.02, 10.0).double()).float()


def samples_per_second(fn, repeats: int = 3) -> float:
    """Best-of-``repeats`` throughput of ``fn() -> (N, ...)`` samples (no grad)."""
    best, n = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            n = len(fn())
        best = min(best, time.perf_counter() - t0)
    return n / best


def ring_eval(student, seed: int) -> dict[str, float]:
    """Mode TV/coverage/precision, k-NN precision/recall (k=3) and 2-D FD against 4000 true samples,
    FD to the teacher's samples, for the student and (``*_teacher``) the Heun-35 teacher."""
    from fastgen.data.toy import ring_mixture

    gm = ring_mixture(weights="imbalanced")
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1000 + seed))
    data, _ = gm.sample(4000, torch.Generator().manual_seed(2000 + seed))
    with torch.no_grad():
        x = student(z, {})
    xt = ring_teacher(seed)
    out: dict[str, float] = {}
    for suffix, s in (("", x), ("_teacher", xt)):
        out.update({f"{k}{suffix}": v for k, v in ring_metrics(s).items()})
        pr = knn_precision_recall(s, data, k=3)
        out[f"knn_precision{suffix}"], out[f"knn_recall{suffix}"] = pr["precision"], pr["recall"]
        out[f"fd_data{suffix}"] = fd_between(s, data, "pixels")
    out["fd_teacher"] = fd_between(x, xt, "pixels")
    out["samples_per_s"] = samples_per_second(lambda: student(z, {}))
    return out


# ---------------------------------------------------------------------------------------------- driver
def cache_path(name: str, seed: int, steps: int) -> Path:
    return CACHE / f"{name}_s{seed}_n{steps}.json"


def run(name: str, seed: int, steps: int, variants: dict | None = None) -> dict[str, float]:
    """Metrics of variant ``name`` for ``seed`` at ``steps`` iterations (cached)."""
    variants = variants or VARIANTS
    path = cache_path(name, seed, steps)
    if path.is_file():
        return json.loads(path.read_text())["metrics"]
    bed, _, extra = variants[name]
    student, _method, minutes = train_variant(bed, extra, seed, steps)
    metrics = digits_eval(student, seed) if bed == "digits" else ring_eval(student, seed)
    metrics["minutes"] = minutes
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"variant": name, "bed": bed, "overrides": extra, "seed": seed, "steps": steps,
                                "metrics": metrics}, indent=1) + "\n")
    return metrics


def _cell(vals: list[float], digits: int = 3) -> str:
    m, lo, hi = mean_ci(vals)
    return f"{m:.{digits}f}" if len(vals) == 1 else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def collect(bed: str) -> dict[tuple[str, int], list[dict[str, float]]]:
    """All cached runs of ``bed``: ``{(variant, steps): [metrics per seed]}``."""
    out: dict[tuple[str, int], list[dict[str, float]]] = {}
    for f in sorted(CACHE.glob("*_s*_n*.json")):
        d = json.loads(f.read_text())
        if d["bed"] == bed:
            out.setdefault((d["variant"], d["steps"]), []).append(d["metrics"])
    return out


def digits_table(runs: dict, names: list[str] | None = None) -> str:
    rows = []
    for (name, steps), res in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if names is not None and name not in names:
            continue
        what = VARIANTS[name][1] if name in VARIANTS else name
        col = {k: [r[k] for r in res] for k in res[0]}
        rows.append([name, what, steps, len(res), _cell(col["fd_data_student"]), _cell(col["fd_data_ratio"], 2),
                     _cell(col["fd_teacher"]), _cell(col["rec_ratio"], 2), _cell(col["prec_ratio"], 2),
                     _cell(col["rec_vs_teacher"]), _cell(col["div_ratio"], 2)])
    head = ["variant", "change", "iterations", "seeds", "FD_digits to data", "/ teacher", "FD to teacher",
            "recall / teacher", "precision / teacher", "recall vs teacher samples", "diversity / teacher"]
    return markdown_table(head, rows)


def ring_table(runs: dict) -> str:
    rows = []
    for (name, steps), res in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if name.startswith("ring-") and name[5:].rsplit("-", 1)[-1] in TABLE_METHODS and name != "ring-js-fd":
            continue  # the equal-budget table (its JS f-distill cell is the reference: log-sigma bins)
        what = VARIANTS[name][1] if name in VARIANTS else name
        col = {k: [r[k] for r in res] for k in res[0]}
        excess = [r["tv"] - r["tv_teacher"] for r in res]
        rows.append([name, what, steps, len(res), _cell(col["tv"]), _cell(col["tv_teacher"]), _cell(excess),
                     _cell(col["modes"], 2), _cell(col["knn_recall"]), _cell(col["knn_precision"])])
    head = ["variant", "change", "iterations", "seeds", "mode TV", "teacher TV (Heun 35)", "TV - teacher TV",
            "modes covered (of 8)", "k-NN recall", "k-NN precision"]
    return markdown_table(head, rows) if rows else ""


def equal_budget_table(runs: dict) -> str:
    """Divergence x method on the ring at one budget, with the paper's mode-coverage claim checked."""
    rows, claim, teacher = [], [], []
    for d, dn in TABLE_DIVS.items():
        for m, (mn, _) in TABLE_METHODS.items():
            hits = [(k, v) for k, v in runs.items() if k[0] == f"ring-{d.replace(':', '')}-{m}"]
            if not hits:
                continue
            (_, steps), res = max(hits, key=lambda kv: (len(kv[1]), kv[0][1]))
            col = {k: [r[k] for r in res] for k in res[0]}
            teacher = teacher or res  # the teacher depends on the seed only
            rows.append([dn, mn, steps, len(res), _cell(col["fd_data"]), _cell(col["fd_teacher"]),
                         _cell(col["knn_precision"]), _cell(col["knn_recall"]), _cell(col["tv"]),
                         _cell(col["modes"], 2), f"{sum(col['samples_per_s']) / len(res):.3g}"])
            claim.append((d, m, col["knn_recall"]))
    if not rows:
        return ""
    tcol = {k: [r[f"{k}_teacher"] for r in teacher] for k in ("fd_data", "knn_precision", "knn_recall", "tv", "modes")}
    rows.insert(0, ["(teacher, Heun 35 NFE)", "exact mixture", "-", len(teacher), _cell(tcol["fd_data"]), "-",
                    _cell(tcol["knn_precision"]), _cell(tcol["knn_recall"]), _cell(tcol["tv"]),
                    _cell(tcol["modes"], 2), "-"])
    head = ["divergence", "method", "iterations", "seeds", "FD to data", "FD to teacher", "k-NN precision",
            "k-NN recall", "mode TV", "modes covered", "student samples/s"]
    verdicts = []
    for m, (mn, _) in TABLE_METHODS.items():
        rec = {d: mean_ci(v) for d, mm, v in claim if mm == m}
        nseeds = {d: len(v) for d, mm, v in claim if mm == m}
        for d in ("forward_kl", "js"):
            if d in rec and "reverse_kl" in rec:
                lo_gt_hi = rec[d][1] > rec["reverse_kl"][2]
                hi_lt_lo = rec[d][2] < rec["reverse_kl"][1]
                word = "holds" if lo_gt_hi else "is reversed" if hi_lt_lo else "is not shown (95% intervals overlap)"
                if min(nseeds[d], nseeds["reverse_kl"]) < 3:
                    word = (f"cannot be decided from {min(nseeds[d], nseeds['reverse_kl'])} seed(s) "
                            f"({'higher' if rec[d][0] > rec['reverse_kl'][0] else 'not higher'} as a point estimate)")
                verdicts.append(f"{mn}: {TABLE_DIVS[d]} k-NN recall {rec[d][0]:.3f} vs reverse-KL "
                                f"{rec['reverse_kl'][0]:.3f}: the claim (recall above reverse-KL's) {word}")
    return markdown_table(head, rows) + ("\n\n" + "\n".join(f"- {v}" for v in verdicts) if verdicts else "")


def paired_table() -> str:
    """Per :data:`PAIRED` row and metric: both means and the mean [95% t-interval] of the per-seed differences."""
    rows = []
    for bed, a, b, steps, metrics in PAIRED:
        seeds = [s for s in range(100) if cache_path(a, s, steps).is_file() and cache_path(b, s, steps).is_file()]
        if len(seeds) < 2:
            continue
        ra = [json.loads(cache_path(a, s, steps).read_text())["metrics"] for s in seeds]
        rb = [json.loads(cache_path(b, s, steps).read_text())["metrics"] for s in seeds]
        for k in metrics:
            diff = [x[k] - y[k] for x, y in zip(ra, rb)]
            m, lo, hi = mean_ci(diff)
            rows.append([bed, f"{a} vs {b}", steps, len(seeds), k, f"{mean_ci([x[k] for x in ra])[0]:.3f}",
                         f"{mean_ci([y[k] for y in rb])[0]:.3f}", f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"])
    head = ["bed", "variant vs reference", "iterations", "seeds", "metric", "variant", "reference",
            "difference (paired by seed)"]
    return markdown_table(head, rows) if rows else ""


def report() -> Path:
    parts = [
        "Short-budget ablations of the f-distill recipe (one knob at a time from the config named in the "
        "row); every cell is a mean over the listed seeds [95% t-interval] (one seed: screening, no "
        "interval). Digits: `digits-edm` teacher at Heun 35 NFE on the same noise, 899 class-cycled samples; "
        "ratios are student / teacher per seed, then averaged. Recall/precision: k-NN (k=3, pixels) "
        "against the 899 held-out digits.",
        "### Digits\n\n" + digits_table(collect("digits")),
        "**The student at step 0** (a teacher copy evaluated once at the student sigma, seed 0, no training):\n\n"
        + init_table(),
    ]
    if paired_table():
        parts.append("### Paired by seed\n\nSame seeds and budget; ratios are student / teacher per seed.\n\n"
                     + paired_table())
    ring = collect("ring")
    if ring_table(ring):
        parts.append("### 8-mode imbalanced ring (exact teacher)\n\n" + ring_table(ring))
    if equal_budget_table(ring):
        parts.append(
            "### Equal-budget table: divergence x {f-distill, Uni-Instruct, f-distill + regression} (8-mode "
            "imbalanced ring)\n\n"
            "`ring-js.yaml` with `method.name`, `method.divergence` and `method.regression_weight` set; the same "
            "iterations, batch and "
            "optimizer for every cell; 4000 samples per seed against 4000 true samples (FD: 2-D Frechet "
            "distance; k-NN precision/recall, k=3) and against the exact teacher sampled with Heun at 35 NFE. "
            "Uni-Instruct: `sim_weight` 1, `di_term` exact (reverse-KL is then SiD with alpha = 1/2).\n\n"
            + equal_budget_table(ring))
    notes = RESULTS / "fdistill_ablations_notes.md"
    if notes.is_file():
        parts.append(notes.read_text().strip())
    return write_section("fdistill_ablations", "f-distill ablations: where the student loses modes", "\n\n".join(parts))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="", help="comma-separated names of VARIANTS to run")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--report", action="store_true", help="write the BENCHMARKS.md section from the cache")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    args = ap.parse_args(argv)
    if args.list:
        for k, (bed, what, extra) in VARIANTS.items():
            print(f"{k:14s} {bed:7s} {what}  {extra}")
        return
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; --list shows them")
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            m = run(name, seed, args.steps)
            print(name, seed, args.steps, {k: round(v, 4) for k, v in m.items()}, flush=True)
    if args.report:
        print(report().read_text())


if __name__ == "__main__":
    main()
