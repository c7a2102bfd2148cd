"""Student vs teacher with metrics that separate the two errors (issue 17, item 1).

The shipped ``digits-fdistill-js`` one-step student against its ``digits-edm`` teacher (Heun, 35 NFE on
the Karras 18-step grid), ``SEEDS`` seeds x 899 class-cycled samples each:

- FD_digits to the 899 held-out digits (student, teacher);
- FD_digits of the student to the teacher's samples, next to the floor (teacher vs teacher, other noise);
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


def one_seed(seed: int, num: int, t_sample, s_sample, data: torch.Tensor) -> dict[str, float]:
    """All metrics for one seed: teacher and student share noise ``seed``; the floor uses ``seed + 10_000``."""
    labels = torch.arange(num) % 10
    with torch.no_grad():
        xt = t_sample(_noise(num, seed), labels)
        xt2 = t_sample(_noise(num, seed + 10_000), labels)
        xs = s_sample(_noise(num, seed), labels)
    ft = fd_to_teacher(xs, xt, xt2, features="digits")
    out = {
        "fd_data_teacher": fd_between(xt, data, "digits"),
        "fd_data_student": fd_between(xs, data, "digits"),
        "fd_to_teacher": ft["fd_to_teacher"],
        "fd_teacher_floor": ft["floor"],
        "div_teacher": class_diversity(xt)["diversity"],
        "div_student": class_diversity(xs)["diversity"],
    }
    for who, x in (("teacher", xt), ("student", xs)):
        pr = knn_precision_recall(x, data, k=3)
        out[f"prec_data_{who}"], out[f"rec_data_{who}"] = pr["precision"], pr["recall"]
    pr = knn_precision_recall(xs, xt, k=3)
    out["prec_teacher_student"], out["rec_teacher_student"] = pr["precision"], pr["recall"]
    pr = knn_precision_recall(xt2, xt, k=3)  # teacher vs teacher: the ceiling for the row above
    out["prec_teacher_teacher"], out["rec_teacher_teacher"] = pr["precision"], pr["recall"]
    return out


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
    n = len(results)
    return (
        f"`{STUDENT}` (1 NFE) vs `{TEACHER}` (Heun, 35 NFE), {n} seeds x {num} class-cycled samples; "
        "mean over seeds [95% t-interval]. Real floor: the 898 train digits vs the 899 held-out digits.\n\n"
        "**Against held-out data**\n\n"
        + markdown_table(["metric", "train vs held-out", "teacher", "student", "student / teacher"], rows)
        + "\n\n**Against the teacher's own samples** (floor = teacher vs teacher with other noise)\n\n"
        + markdown_table(["metric", "teacher vs teacher (floor)", "student vs teacher"], t_rows)
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
    path = write_section("student_coverage", "One-step student vs teacher: coverage metrics",
                         report(results, args.num, floor))
    print(path.read_text())


if __name__ == "__main__":
    main()
