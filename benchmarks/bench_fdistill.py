"""f-distill benchmarks: mode coverage on an imbalanced mixture, digits FD per divergence, speed.

1. **Imbalanced 8-mode ring** (exact teacher, MLP generator and fake score, (x_t, log sigma) head):
   per divergence over several seeds -- modes covered (>= 1/4 of the true mass), mode-weight TV,
   precision (within 3 std of a mode) and energy distance to true samples.
2. **Digits:** FD_digits (test split, 900 samples) of the one-step EMA student per divergence, read
   from ``benchmarks/results/fdistill_digits.json`` (written by ``scripts/distill_digits.sh``, which runs
   ``fastgen distill`` on each ``fastgen/configs/distill/digits-*.yaml``), against the teacher at 35 NFE Heun.
3. **Speed:** samples/s of the one-step student vs the teacher at 35 NFE Heun, same batch.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.bench_fdistill [--seeds 3] [--steps 3000]`` (ring results are
cached per divergence in ``benchmarks/results/fdistill_ring_<div>.json``; ``--ring-only DIV`` fills one cache,
so the divergences can run as parallel processes).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import RESULTS, markdown_table, write_section
from fastgen.data.toy import ring_mixture
from fastgen.distill import FDistill, FDistillConfig, OneStepStudent, toy_mlp

DIVERGENCES = ("reverse_kl", "js", "forward_kl", "hellinger")
DIGITS_JSON = RESULTS / "fdistill_digits.json"


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def mode_metrics(x: torch.Tensor, gm) -> dict[str, float]:
    """Precision, modes covered (>= 1/4 of true mass) and mode-weight TV of samples ``x`` (n, 2)."""
    d = torch.cdist(x.double(), gm.means.double())
    near = d.min(1).values < 3 * gm.stds.double()[d.argmin(1)]
    hist = torch.bincount(d.argmin(1)[near], minlength=gm.num_modes).double() / len(x)
    covered = int((hist >= gm.weights / 4).sum())
    tv = 0.5 * float((hist / hist.sum().clamp_min(1e-12) - gm.weights).abs().sum())
    return {"precision": float(near.double().mean()), "modes": covered, "tv": tv}


def distill_ring(divergence: str, seed: int, steps: int) -> dict[str, float]:
    """Distill a one-step MLP from the exact imbalanced ring teacher; return the metrics."""
    gm = ring_mixture(weights="imbalanced")
    torch.manual_seed(seed)
    student = OneStepStudent(toy_mlp(2, 128, 3))
    fake = toy_mlp(2, 128, 3, edm=True)
    cfg = FDistillConfig(
        sample_shape=(2,),
        divergence=divergence,
        sigma_min=0.02,
        sigma_max=10.0,
        placement="input",
        lambda_gan=1e-3,
        student_every=2,
        t_index_lo=0,
        t_index_hi=999,
        seed=seed,
    )
    m = FDistill(gm.denoiser().float(), cfg, student=student, fake_score=fake)
    nets = m.networks()
    opts = {
        k: torch.optim.Adam([p for n in grp for p in nets[n].parameters()], lr=1e-3, betas=(0.0, 0.99))
        for k, grp in m.optimizer_groups().items()
    }
    g = torch.Generator().manual_seed(seed)
    for it in range(steps):
        for k, loss in m.step({"x": gm.sample(256, g)[0]}, it, g).items():
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
    x = m.sample(4000, torch.Generator().manual_seed(1000 + seed))
    ref, _ = gm.sample(4000, torch.Generator().manual_seed(2000 + seed))
    return {**mode_metrics(x, gm), "energy": energy_distance(x, ref)}


def ring_results(div: str, seeds: int, steps: int) -> list[dict[str, float]]:
    """Per-seed metrics for one divergence, cached in ``benchmarks/results/fdistill_ring_<div>.json``."""
    cache = RESULTS / f"fdistill_ring_{div}.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data["seeds"] == seeds and data["steps"] == steps:
            return data["results"]
    res = [distill_ring(div, s, steps) for s in range(seeds)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"seeds": seeds, "steps": steps, "results": res}, indent=1) + "\n")
    return res


def ring_section(seeds: int, steps: int) -> str:
    rows = []
    for div in DIVERGENCES:
        res = ring_results(div, seeds, steps)

        def ms(key: str, res=res) -> str:
            v = torch.tensor([r[key] for r in res], dtype=torch.float64)
            return f"{float(v.mean()):.3f} ± {float(v.std()) if len(v) > 1 else 0.0:.3f}"

        rows.append([div, ms("modes"), ms("tv"), ms("precision"), ms("energy")])
    gm = ring_mixture(weights="imbalanced")
    w = ", ".join(f"{float(v):.3f}" for v in gm.weights)
    return (
        f"Exact teacher: 8-mode ring (radius 3, std 0.15), imbalanced weights ({w}). One-step MLP "
        f"generator (3x128), MLP fake score, discriminator on (x_t, log sigma); {steps} iterations "
        f"(student every 2nd), batch 256, Adam 1e-3, lambda_G = 1e-3; mean ± std over {seeds} seeds; "
        "4000 samples. Modes covered: modes holding >= 1/4 of their true mass (of 8); TV: mode-weight "
        "total variation; precision: fraction within 3 std of a mode.\n\n"
        + markdown_table(["divergence", "modes covered", "mode TV", "precision", "energy distance"], rows)
    )


def _digits_table(data: dict) -> str:
    t = data["teacher"]
    rows = [["teacher (Heun, 35 NFE)", 35, f"{t['fd']:.3f}", "1.00", "—", "—"]]
    for div, r in data["students"].items():
        rows.append(
            [
                f"one-step student, {div}",
                1,
                f"{r['fd']:.3f}",
                f"{r['fd'] / t['fd']:.2f}",
                r["steps"],
                f"{r['minutes']:.0f}",
            ]
        )
    head = ["model", "NFE", "FD_digits", "FD / teacher FD", "iterations", "minutes (wall)"]
    parts = [data["title"]] if data.get("title") else []
    parts.append(f"Teacher: {data['teacher_name']}.")
    parts.append(markdown_table(head, rows))
    if data.get("note"):
        parts.append(data["note"])
    return "\n\n".join(parts)


def digits_section() -> str:
    """Tables from ``benchmarks/results/fdistill_digits*.json`` (one per file, sorted by name)."""
    files = sorted(RESULTS.glob("fdistill_digits*.json"))
    if not files:
        return "_No digits results yet: run `scripts/distill_digits.sh` to write them._"
    intro = (
        "FD_digits against the 899 held-out test digits, 900 samples (90 per class), the same noise seed "
        "for every row. Students: EMA weights after the given number of iterations (student updated every "
        "5th iteration, critics every iteration, batch 64), one thread per run."
    )
    return intro + "\n\n" + "\n\n".join(_digits_table(json.loads(f.read_text())) for f in files)


def speed_section(teacher, student, batch: int = 900, repeats: int = 5) -> str:
    from fastgen.core import solvers
    from fastgen.core.schedules import karras

    sig = karras(18, 0.002, 80.0)
    labels = torch.arange(batch) % 10
    z = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    tt = best(lambda: solvers.heun(teacher, z * 80.0, sig, class_labels=labels))
    ts = best(lambda: student(z, labels))
    rows = [["teacher, Heun 35 NFE", f"{batch / tt:.0f}"], ["one-step student", f"{batch / ts:.0f}"]]
    return (
        f"Batch {batch} digits, CPU, {torch.get_num_threads()} thread(s), best of {repeats}.\n\n"
        + markdown_table(["sampler", "samples/s"], rows)
        + f"\n\nSpeed-up of the one-step student: **{tt / ts:.1f}x** (ideal 35x: same network, 1 vs 35 calls)."
    )


def sample_grid(teacher, student, path=None) -> str:
    """PNG: 10 samples per class (rows) from the teacher (Heun, 35 NFE) and the one-step student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastgen.core import solvers
    from fastgen.core.schedules import karras

    path = path or RESULTS / "fdistill_digits_samples.png"
    labels = torch.arange(100) // 10
    z = torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        xt = solvers.heun(teacher, z * 80.0, karras(18, 0.002, 80.0), class_labels=labels)
        xs = student(z, labels)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax, x, title in ((axes[0], xt, "teacher, Heun 35 NFE"), (axes[1], xs, "f-distill student, 1 NFE")):
        grid = x.clamp(-1, 1).reshape(10, 10, 8, 8).permute(0, 2, 1, 3).reshape(80, 80)
        ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "![teacher vs one-step student samples](fdistill_digits_samples.png)"


def load_models():
    """(teacher, student) for the speed table: the zoo teacher (or the ``TEACHER`` spec of
    scripts/distill_digits.sh) and the first shipped digits student."""
    import os

    from fastgen.distill.teacher import build_teacher
    from fastgen.models import load_model, zoo

    names = zoo.list_models()
    teacher = None
    if "digits-edm" in names:
        teacher = load_model("digits-edm").denoiser
    elif os.environ.get("TEACHER"):
        teacher, _ = build_teacher(json.loads(os.environ["TEACHER"]))
    students = [n for n in names if n.startswith("digits-fdistill-")]
    student = load_model(students[0]).generator if students else None
    return teacher, student


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--ring-only", metavar="DIV", default=None, help="compute and cache one divergence, then exit")
    args = p.parse_args(argv)
    if args.ring_only:
        ring_results(args.ring_only, args.seeds, args.steps)
        return
    parts = []
    ring = ring_section(args.seeds, args.steps)
    parts.append("### Mode coverage on an imbalanced mixture\n\n" + ring)
    parts.append("### Digits: one-step students vs the teacher\n\n" + digits_section())
    teacher, student = load_models()
    if teacher is not None and student is not None:
        parts.append("### Sampling speed\n\n" + speed_section(teacher, student))
        parts.append("### Samples (rows: classes 0-9, same noise)\n\n" + sample_grid(teacher, student))
    write_section("fdistill", "f-distill: one-step students (DMD2 = reverse-KL)", "\n\n".join(parts))


if __name__ == "__main__":
    main()
