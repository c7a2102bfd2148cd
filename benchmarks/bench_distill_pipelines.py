"""One-step text-to-image students of the shipped pipelines vs their teachers (issue 16, first Done-when).

For each teacher and its one-step students (``digits-sd`` -> ``digits-sd-instaflow`` (``fastgen distill
digits-sd-instaflow``) and ``digits-sd-fdistill-js`` (``fastgen distill digits-sd``); ``digits-sd3`` ->
``digits-sd3-instaflow`` and ``digits-sd3-fdistill-js``; the students are the shipped folders under
``fastgen/models/weights/`` unless ``--students`` names others; absent ones are reported as absent), all loaded
through ``fastgen.models.load_model``:

- student: 100 samples per class from the prompt "a handwritten digit <class>" (the teacher card's protocol),
  one network call each, noise from ``torch.Generator().manual_seed(1000 * seed + class)``, seeds 0, 1, 2;
  FD_digits of the VAE-decoded images against the digits test split and the digits-classifier accuracy on
  the prompted class; means over the 3 seeds with 95% Student-t intervals (``mean_ci``);
- teacher: the numbers on its model card (``fastgen/models/weights/pipelines/<name>/README.md``: its default
  scheduler, steps and CFG), read at measurement time; ``--measure-teacher`` also measures it here with the
  Diffusers pipeline at the card's steps and CFG on the same 3 seeds (slow on CPU).

Verdict per student: accuracy >= 0.9 and FD_digits <= 1.5x the teacher's (card) FD. Writes the
``distill_pipelines`` section of BENCHMARKS.md. Run:
``OMP_NUM_THREADS=1 python -m benchmarks.bench_distill_pipelines [--quick] [--measure-teacher]``.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import markdown_table, write_section
from fastgen.metrics.coverage import mean_ci
from fastgen.metrics.digits import digits_fd, digits_logits
from fastgen.models import load_model
from fastgen.models.sources import PIPELINES_DIR
from fastgen.models.zoo import WEIGHTS_DIR

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: teacher -> its shipped one-step students (the first is the one the Done-when bar is checked on first).
PAIRS = {"digits-sd": ["digits-sd-instaflow", "digits-sd-fdistill-js"],
         "digits-sd3": ["digits-sd3-instaflow", "digits-sd3-fdistill-js"]}
SEEDS = (0, 1, 2)


def card_numbers(pipeline: str) -> dict[str, float]:
    """``{"fd", "accuracy", "steps", "guidance"}`` from the teacher's model card (its measured section)."""
    text = (PIPELINES_DIR / pipeline / "README.md").read_text()
    fd = re.search(r"FD_digits vs the test split: \*\*([0-9.]+)\*\*", text)
    acc = re.search(r"accuracy on the prompted class: \*\*([0-9.]+)\*\*", text)
    steps = re.search(r"(\d+) steps of the default \w+, guidance_scale ([0-9.]+)", text)
    if not (fd and acc and steps):
        raise ValueError(f"cannot read the measured numbers from the {pipeline} card")
    return {"fd": float(fd.group(1)), "accuracy": float(acc.group(1)), "steps": int(steps.group(1)),
            "guidance": float(steps.group(2))}


def student_samples(model: Any, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded images in [-1, 1] (10 * per_class, 1, 8, 8) and their prompted classes."""
    xs = []
    for c, d in enumerate(DIGITS):
        cond, _ = model.condition(per_class, prompts=[f"a handwritten digit {d}"])
        z = torch.randn((per_class, *model.shape), generator=torch.Generator().manual_seed(1000 * seed + c))
        with torch.no_grad():
            xs.append(model.decode(model.generator(z, cond)))
    return torch.cat(xs), torch.arange(10).repeat_interleave(per_class)


def teacher_samples(pipeline: str, per_class: int, seed: int, steps: int, guidance: float) -> torch.Tensor:
    """The Diffusers pipeline at the card's steps and CFG (images in [-1, 1])."""
    pipe = load_model(pipeline).info["pipeline"]
    xs = []
    for c, d in enumerate(DIGITS):
        kw = {"max_sequence_length": 16} if "StableDiffusion3" in type(pipe).__name__ else {}
        out = pipe([f"a handwritten digit {d}"] * per_class, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(1000 * seed + c), output_type="pt", **kw)
        xs.append(out.images.float() * 2 - 1)
    return torch.cat(xs)


def score(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"fd": digits_fd(x, "test"), "accuracy": float((digits_logits(x).argmax(1) == y).float().mean())}


def measure(pipeline: str, student: str, per_class: int, measure_teacher: bool) -> dict[str, Any]:
    card = card_numbers(pipeline)
    model = load_model(student)
    t0 = time.perf_counter()
    runs = [score(*student_samples(model, per_class, s)) for s in SEEDS]
    res: dict[str, Any] = {"pipeline": pipeline, "student": student, "card": card,
                           "student_seconds": time.perf_counter() - t0,
                           "fd": mean_ci([r["fd"] for r in runs]), "accuracy": mean_ci([r["accuracy"] for r in runs])}
    if measure_teacher:
        y = torch.arange(10).repeat_interleave(per_class)
        t = [score(teacher_samples(pipeline, per_class, s, card["steps"], card["guidance"]), y) for s in SEEDS]
        res["teacher_fd"] = mean_ci([r["fd"] for r in t])
        res["teacher_accuracy"] = mean_ci([r["accuracy"] for r in t])
    res["ratio"] = res["fd"][0] / card["fd"]
    res["pass"] = res["accuracy"][0] >= 0.9 and res["ratio"] <= 1.5
    return res


def _ci(v: tuple[float, float, float], digits: int = 3) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def report(results: list[dict[str, Any]], per_class: int, missing: list[str] | None = None) -> str:
    rows = []
    for r in results:
        c = r["card"]
        teacher = f"{c['fd']:.3f} / {c['accuracy']:.3f} (card; {c['steps']} steps, CFG {c['guidance']:g})"
        if "teacher_fd" in r:
            teacher += f"; here {_ci(r['teacher_fd'])} / {_ci(r['teacher_accuracy'])}"
        rows.append([r["pipeline"], teacher, r["student"], _ci(r["fd"]), _ci(r["accuracy"]), f"{r['ratio']:.2f}x",
                     "yes" if r["pass"] else "no"])
    table = markdown_table(["teacher", "teacher FD_digits / accuracy", "one-step student (1 NFE)",
                            "student FD_digits", "student accuracy", "FD / teacher FD", "meets bar"], rows)
    return (
        f"{per_class} samples per class from \"a handwritten digit <class>\" (the teacher cards' protocol), "
        "one network call per sample, VAE-decoded; FD_digits against the digits test split; accuracy of the "
        "digits classifier on the prompted class. Student numbers: means over noise seeds 0, 1, 2 with 95% "
        "Student-t intervals (one distillation run per student; the intervals are over sampling noise, not "
        "over training seeds). Teacher numbers: its model card, read when this ran. Bar (issue 16): accuracy "
        ">= 0.9 and FD_digits <= 1.5x the teacher's.\n\n" + table + "\n\nStudents: "
        + "; ".join(f"`{r['student']}` (its card has the exact `fastgen distill` command)" for r in results) + "."
        + "".join(f"\n\nNo shipped student `{m}`: not measured." for m in missing or [])
    )


def ship(run: str, name: str) -> Path:
    """Copy a distill run's EMA student into ``fastgen/models/weights/NAME/`` (float16 safetensors + JSON)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(run), WEIGHTS_DIR / name
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.half().contiguous() if v.is_floating_point() else v
             for k, v in load_file(str(src / "student.safetensors")).items()}
    save_file(state, str(dst / "student.safetensors"))
    shutil.copyfile(src / "student.json", dst / "student.json")
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 samples per class; does not write BENCHMARKS.md")
    ap.add_argument("--measure-teacher", action="store_true", help="also sample the teachers (slow on CPU)")
    ap.add_argument("--students", nargs="+", metavar="PIPELINE=STUDENT", default=[],
                    help="student sources other than the shipped ones, e.g. digits-sd=runs/digits-sd-fdistill-js")
    ap.add_argument("--only", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    ap.add_argument("--ship", nargs="+", metavar="NAME=RUN_DIR", default=[],
                    help="first copy a run's student into the shipped student folder NAME (float16), then measure")
    args = ap.parse_args(argv)
    shipped = [n for names in PAIRS.values() for n in names]
    for spec in args.ship:
        k, _, v = spec.partition("=")
        if k not in shipped or not v:
            raise SystemExit(f"--ship takes NAME=RUN_DIR with NAME in {shipped}, got {spec!r}")
        print("shipped", ship(v, k))
    pairs = {k: list(v) for k, v in PAIRS.items()}
    for spec in args.students:
        if "=" not in spec or spec.split("=", 1)[0] not in PAIRS:
            raise SystemExit(f"--students takes PIPELINE=STUDENT with PIPELINE in {sorted(PAIRS)}, got {spec!r}")
        k, v = spec.split("=", 1)
        pairs[k] = [v]
    per_class = 20 if args.quick else 100
    results, missing = [], []
    for pipeline in args.only:
        for student in pairs[pipeline]:
            if student in PAIRS[pipeline] and not (WEIGHTS_DIR / student / "student.json").is_file():
                print(f"skip {pipeline}: no shipped student {student}")
                missing.append(student)
                continue
            r = measure(pipeline, student, per_class, args.measure_teacher)
            print(f"{pipeline} -> {student}: FD {_ci(r['fd'])}, acc {_ci(r['accuracy'])}, {r['ratio']:.2f}x the "
                  f"card's FD {r['card']['fd']}, pass={r['pass']}", flush=True)
            results.append(r)
    if results and not args.quick:
        print(write_section("distill_pipelines", "One-step text-to-image students of digits-sd / digits-sd3",
                            report(results, per_class, missing)))


if __name__ == "__main__":
    main()
