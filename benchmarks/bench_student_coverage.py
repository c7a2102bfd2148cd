"""Student vs teacher with metrics that separate the two errors (issue 17, item 1).

The shipped ``digits-fdistill-js`` one-step student against its ``digits-edm`` teacher (Heun, 35 NFE on
the Karras 18-step grid), ``SEEDS`` seeds x 899 class-cycled samples each:

- FD_digits to the 899 held-out digits (student, teacher);
- FD_digits of the student to the teacher's samples, next to the floor (teacher vs teacher, other noise);
  the student draws its own noise, independent of both teacher draws: a student trained with DMD's
  regression loss maps a noise to (nearly) the teacher's ODE output from that noise, so on shared noise
  it would "cover" the teacher by construction. The paired distance (same noise) is reported apart;
- k-NN precision/recall (k=3, raw pixels) against the held-out data and against the teacher's samples;
- per-class diversity (mean within-class per-pixel std, classes from the digits classifier).

Every number is a mean over seeds with a 95% t-interval (never the best seed). Run:
``python -m benchmarks.bench_student_coverage [--seeds 3] [--num 899]``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import markdown_table, write_section
from fastgen.metrics.coverage import class_diversity, fd_between, fd_to_teacher, knn_precision_recall, mean_ci

TEACHER, STUDENT = "digits-edm", "digits-fdistill-js"
TEMPERATURES = (0.8, 1.0, 1.5, 2.0)


def _samplers():
    from fastgen.core import solvers
    from fastgen.core.schedules import karras
    from fastgen.models import load_model

    teacher, student = load_model(TEACHER), load_model(STUDENT)
    sig = karras(18, 0.002, 80.0)  # Heun on 18 sigmas = 35 NFE

    def t_sample(z, labels):
        return solvers.heun(teacher.denoiser, z * 80.0, sig, class_labels=labels).clamp(-1, 1)

    def s_sample(z, labels):
        return student.generator(z, labels).clamp(-1, 1)

    return t_sample, s_sample


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


#: Noise seeds per evaluation seed: the teacher's sample set, the teacher's second draw (the floor) and the
#: student's own draw, pairwise independent.
FLOOR_OFFSET, STUDENT_OFFSET = 10_000, 20_000


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the per-sample pixel RMS distance."""
    return float((a - b).reshape(len(a), -1).pow(2).mean(1).sqrt().mean())


def contract(x: torch.Tensor, labels: torch.Tensor, a: float) -> torch.Tensor:
    """``x`` pulled towards its class means: ``mu_c + a (x - mu_c)`` within each class of ``labels``."""
    y = x.clone()
    for c in labels.unique():
        m = labels == c
        mu = x[m].mean(0, keepdim=True)
        y[m] = mu + a * (x[m] - mu)
    return y


def one_seed(seed: int, num: int, t_sample, s_sample, data: torch.Tensor) -> dict[str, float]:
    """All metrics for one seed: the teacher on noise ``seed``, its floor draw on ``seed + FLOOR_OFFSET``,
    the student on ``seed + STUDENT_OFFSET``; ``rms_paired`` also runs the student on the teacher's own
    noise (its distance to the teacher sample by sample)."""
    labels = torch.arange(num) % 10
    with torch.no_grad():
        xt = t_sample(_noise(num, seed), labels)
        xt2 = t_sample(_noise(num, seed + FLOOR_OFFSET), labels)
        xs = s_sample(_noise(num, seed + STUDENT_OFFSET), labels)
        xs_paired = s_sample(_noise(num, seed), labels)
    ft = fd_to_teacher(xs, xt, xt2, features="digits")
    out = {
        "fd_data_teacher": fd_between(xt, data, "digits"),
        "fd_data_student": fd_between(xs, data, "digits"),
        "fd_to_teacher": ft["fd_to_teacher"],
        "fd_teacher_floor": ft["floor"],
        "div_teacher": class_diversity(xt)["diversity"],
        "div_student": class_diversity(xs)["diversity"],
        "rms_paired": _rms(xs_paired, xt),  # student and teacher from the same noise
        "rms_unpaired": _rms(xt2, xt),  # two teacher samples of the same class from different noise
    }
    for who, x in (("teacher", xt), ("student", xs)):
        pr = knn_precision_recall(x, data, k=3)
        out[f"prec_data_{who}"], out[f"rec_data_{who}"] = pr["precision"], pr["recall"]
    pr = knn_precision_recall(xs, xt, k=3)
    out["prec_teacher_student"], out["rec_teacher_student"] = pr["precision"], pr["recall"]
    pr = knn_precision_recall(xt2, xt, k=3)  # teacher vs teacher: the ceiling for the row above
    out["prec_teacher_teacher"], out["rec_teacher_teacher"] = pr["precision"], pr["recall"]
    # How much of the gap a plain contraction explains: the teacher's samples shrunk towards their class
    # means until their within-class spread is the student's.
    a = class_diversity(xs, labels)["diversity"] / class_diversity(xt, labels)["diversity"]
    xc = contract(xt, labels, a)
    pr = knn_precision_recall(xc, data, k=3)
    out.update(contraction=a, fd_data_contracted=fd_between(xc, data, "digits"), rec_data_contracted=pr["recall"],
               prec_data_contracted=pr["precision"])
    return out


def _covered(ref: torch.Tensor, gen: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Bool ``(N_ref,)``: which reference samples lie in some generated sample's k-NN ball (pixels)."""
    r, g = ref.reshape(len(ref), -1).double(), gen.reshape(len(gen), -1).double()
    radii = torch.cdist(g, g).kthvalue(k + 1, dim=1).values
    return (torch.cdist(r, g) <= radii.unsqueeze(0)).any(dim=1)


def where_lost(seed: int, num: int, t_sample, s_sample) -> dict[str, list[float]]:
    """Recall of the student against the teacher's samples, split by class and by how far each teacher
    sample lies from its class mean (quartiles within each class: q1 = most typical, q4 = the tails)."""
    labels = torch.arange(num) % 10
    with torch.no_grad():
        xt, xs = t_sample(_noise(num, seed), labels), s_sample(_noise(num, seed + STUDENT_OFFSET), labels)
        xt2 = t_sample(_noise(num, seed + FLOOR_OFFSET), labels)
    out: dict[str, list[float]] = {"class_student": [], "class_floor": [], "q_student": [], "q_floor": []}
    cov_s, cov_f = _covered(xt, xs), _covered(xt, xt2)
    dist = torch.empty(num, dtype=torch.float64)
    for c in range(10):
        m = labels == c
        out["class_student"].append(float(cov_s[m].double().mean()))
        out["class_floor"].append(float(cov_f[m].double().mean()))
        xc = xt[m].reshape(int(m.sum()), -1).double()
        d = (xc - xc.mean(0)).norm(dim=1)
        dist[m] = d.argsort().argsort().double() / (len(d) - 1)  # rank within the class in [0, 1]
    for q in range(4):
        sel = (dist >= q / 4) & (dist <= (q + 1) / 4) if q == 3 else (dist >= q / 4) & (dist < (q + 1) / 4)
        out["q_student"].append(float(cov_s[sel].double().mean()))
        out["q_floor"].append(float(cov_f[sel].double().mean()))
    for scale in TEMPERATURES:  # does the student's coverage grow with the noise scale (a contracted map)?
        with torch.no_grad():
            xz = s_sample(_noise(num, seed + STUDENT_OFFSET) * scale, labels)
        out.setdefault("t_recall", []).append(knn_precision_recall(xz, xt, k=3)["recall"])
        out.setdefault("t_precision", []).append(knn_precision_recall(xz, xt, k=3)["precision"])
        out.setdefault("t_div", []).append(class_diversity(xz)["diversity"])
    return out


def where_report(res: list[dict[str, list[float]]]) -> str:
    def cell(key: str, i: int) -> str:
        return _fmt([r[key][i] for r in res])

    rows = [[f"digit {c}", cell("class_floor", c), cell("class_student", c)] for c in range(10)]
    qrows = [[f"q{q + 1}" + (" (typical)" if q == 0 else " (tails)" if q == 3 else ""),
              cell("q_floor", q), cell("q_student", q)] for q in range(4)]
    trows = [[f"{t:g}", cell("t_recall", i), cell("t_precision", i), cell("t_div", i)]
             for i, t in enumerate(TEMPERATURES)]
    return (
        "**Where recall is lost** (pixels, k=3, balls over the whole sample set; fraction of the teacher's "
        "samples covered by the student's balls vs by another teacher draw's)\n\n"
        + markdown_table(["teacher samples of", "teacher vs teacher (floor)", "student vs teacher"], rows)
        + "\n\nBy distance of the teacher sample from its class mean (quartiles within each class):\n\n"
        + markdown_table(["distance quartile", "teacher vs teacher (floor)", "student vs teacher"], qrows)
        + "\n\nStudent noise scaled by a temperature (student input z * T; teacher samples unchanged):\n\n"
        + markdown_table(["T", "recall vs teacher", "precision vs teacher", "within-class std"], trows)
    )


def _fmt(vals: list[float]) -> str:
    m, lo, hi = mean_ci(vals)
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def report(results: list[dict[str, float]], num: int, floor: dict[str, float]) -> str:
    col = {k: [r[k] for r in results] for k in results[0]}
    ratio = {k: [r[f"{k}_student"] / r[f"{k}_teacher"] for r in results]
             for k in ("fd_data", "rec_data", "prec_data", "div")}
    rows = [
        ["FD_digits to held-out data", f"{floor['fd']:.3f}", _fmt(col["fd_data_teacher"]),
         _fmt(col["fd_data_student"]), _fmt(ratio["fd_data"])],
        ["k-NN recall vs data (k=3, pixels)", f"{floor['rec']:.3f}", _fmt(col["rec_data_teacher"]),
         _fmt(col["rec_data_student"]), _fmt(ratio["rec_data"])],
        ["k-NN precision vs data (k=3, pixels)", f"{floor['prec']:.3f}", _fmt(col["prec_data_teacher"]),
         _fmt(col["prec_data_student"]), _fmt(ratio["prec_data"])],
        ["within-class per-pixel std", f"{floor['div']:.3f}", _fmt(col["div_teacher"]),
         _fmt(col["div_student"]), _fmt(ratio["div"])],
    ]
    t_rows = [
        ["FD_digits to the teacher's samples", _fmt(col["fd_teacher_floor"]), _fmt(col["fd_to_teacher"])],
        ["k-NN recall vs teacher samples", _fmt(col["rec_teacher_teacher"]), _fmt(col["rec_teacher_student"])],
        ["k-NN precision vs teacher samples", _fmt(col["prec_teacher_teacher"]), _fmt(col["prec_teacher_student"])],
    ]
    c_rows = [
        [name, _fmt(col[f"{key}_teacher"]), _fmt(col[f"{key}_contracted"]), _fmt(col[f"{key}_student"]),
         _fmt([r[f"{key}_contracted"] / r[f"{key}_teacher"] for r in results])]
        for name, key in (("FD_digits to held-out data", "fd_data"), ("k-NN recall vs data", "rec_data"),
                          ("k-NN precision vs data", "prec_data"))
    ]
    n = len(results)
    return (
        f"`{STUDENT}` (1 NFE) vs `{TEACHER}` (Heun, 35 NFE), {n} seeds x {num} class-cycled samples; "
        "mean over seeds [95% t-interval]. Real floor: the 898 train digits vs the 899 held-out digits.\n\n"
        "**Against held-out data**\n\n"
        + markdown_table(["metric", "train vs held-out", "teacher", "student", "student / teacher"], rows)
        + "\n\n**Against the teacher's own samples** (floor = teacher vs teacher with other noise; the student "
        "draws its own noise, independent of both teacher draws)\n\n"
        + markdown_table(["metric", "teacher vs teacher (floor)", "student vs teacher"], t_rows)
        + "\n\nPaired (same noise): the student's per-sample pixel RMS distance to the teacher's sample from the "
        f"same noise is {_fmt(col['rms_paired'])}; two teacher samples of the same class from different noise lie "
        f"{_fmt(col['rms_unpaired'])} apart. A student trained with DMD's regression loss is close to its teacher "
        "sample by sample, which is why the rows above draw its noise apart: on shared noise the coverage of the "
        "teacher's samples would hold by construction."
        + "\n\n**How much a contraction explains.** The teacher's samples pulled towards their class means, "
        "`mu_c + a (x - mu_c)`, with `a` = the student's within-class per-pixel std over the teacher's "
        f"({_fmt(col['contraction'])}), so that their spread is the student's:\n\n"
        + markdown_table(["metric", "teacher", "teacher contracted", "student", "contracted / teacher"], c_rows)
    )


def main(argv: list[str] | None = None) -> None:
    from fastgen.data import load_digits_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--num", type=int, default=899)
    args = ap.parse_args(argv)
    if args.seeds < 2 or args.num < 20:
        raise SystemExit("--seeds must be >= 2 (for an interval) and --num >= 20")
    data, train = load_digits_split("test").images, load_digits_split("train").images
    t_sample, s_sample = _samplers()
    results = []
    for seed in range(args.seeds):
        results.append(one_seed(seed, args.num, t_sample, s_sample, data))
        print(seed, {k: round(v, 4) for k, v in results[-1].items()}, flush=True)
    pr = knn_precision_recall(train, data, k=3)
    floor = {"fd": fd_between(train, data, "digits"), "rec": pr["recall"], "prec": pr["precision"],
             "div": class_diversity(train, labels=load_digits_split("train").labels)["diversity"]}
    lost = [where_lost(seed, args.num, t_sample, s_sample) for seed in range(args.seeds)]
    path = write_section("student_coverage", "One-step student vs teacher: coverage metrics",
                         report(results, args.num, floor) + "\n\n" + where_report(lost))
    print(path.read_text())


if __name__ == "__main__":
    main()
