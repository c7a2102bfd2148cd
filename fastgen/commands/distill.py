"""``fastgen distill NAME|CONFIG [--set key=value ...]``: distill a student (f-distill, InstaFlow, SFD, BOSS).

The config is a training config (``fastgen/configs/distill/*.yaml``) whose ``method.name`` is one of
:data:`DISTILL_METHODS`: ``fdistill`` / ``uni_instruct`` (one-step student), ``instaflow`` (text-to-image
reflow, then one step: ``digits-sd-instaflow``, ``digits-sd3-instaflow``), ``sfd`` (few-step SFD student,
``digits-sfd``) or ``boss`` (BOSS-straightened model on its DP Euler schedule, ``digits-boss``); the few-step
students sample through ``load_model`` / ``fastgen sample --model`` like one-step students.

InstaFlow runs in two stages. A one-step config names its stage-1 (2-rectified flow) config as
``method.stage1``: its teacher is that run's exported pipeline ``<stage-1 output_dir>/pipeline``, trained
first (by this command, in the same processes) when that folder does not exist yet, and the student's text
encoders and VAE are stage 1's teacher's (``base_pipeline``). Every instaflow run also writes its Diffusers
pipeline folder ``<output_dir>/pipeline``; a one-step run (``distill_steps: 1``) writes the one-step student
``student.safetensors`` + ``student.json`` as f-distill does (:meth:`InstaFlowMethod.one_step_student`).
After training, the EMA student is written to ``<output_dir>/student.safetensors`` + ``student.json``
(load with :func:`fastgen.distill.load_student` or wrap in :class:`fastgen.distill.OneStepPipeline`);
``--export NAME`` also writes it into the model zoo folder as ``NAME`` (``fastgen.models.load(NAME)``).
For digits data or digits-shaped students, ``--eval N`` reports FD_digits of N student samples.

Multi-process: ``accelerate launch --num_processes 2 [--cpu] -m fastgen.cli distill CONFIG``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fastgen.commands._configs import add_config_arguments, resolve_config

#: Methods ``fastgen distill`` runs (f-distill / Uni-Instruct one-step; InstaFlow; SFD and BOSS few-step).
DISTILL_METHODS = ("fdistill", "uni_instruct", "instaflow", "sfd", "boss")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distill a student (f-distill / DMD2 one-step, InstaFlow one-step, SFD few-step, BOSS straightening) "
        "from a shipped config NAME or a YAML path",
        description="Train a student with fastgen's trainer: a one-step student by f-divergence distribution "
        "matching (method fdistill), an InstaFlow one-step text-to-image student (instaflow: digits-sd-instaflow, "
        "digits-sd3-instaflow; its 2-rectified-flow stage 1 is trained first when missing), an SFD few-step "
        "student (sfd: digits-sfd, digits-sfd-v) or a BOSS-straightened model on its DP Euler schedule "
        "(boss: digits-boss). Re-running resumes from the latest checkpoint in output_dir.",
    )
    add_config_arguments(p, "distill", "digits-js")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.add_argument("--export", metavar="NAME", default=None, help="also write the student to the model zoo as NAME")
    p.add_argument("--eval", metavar="N", type=int, default=0, help="digits only: FD_digits of N student samples")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import fastgen.distill  # noqa: F401  (registers the distillation methods: fdistill, sfd, boss, ...)
    from fastgen.train import Trainer, load_config

    if args.export:  # checked before training, not after it
        from fastgen.io.paths import check_inside
        from fastgen.models.zoo import WEIGHTS_DIR

        if check_inside(args.export, WEIGHTS_DIR, "--export") == WEIGHTS_DIR.resolve():
            raise ValueError(f"--export {args.export!r} names the zoo folder itself; give a model name")
    if args.eval and args.eval < 2:
        raise ValueError(f"--eval must be 0 (off) or >= 2 samples, got {args.eval}")
    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    cfg = load_config(resolve_config(args.config, "distill"), overrides)
    if cfg.method.get("name") not in DISTILL_METHODS:
        raise ValueError(f"method.name must be one of {DISTILL_METHODS} for fastgen distill, "
                         f"got {cfg.method.get('name')!r}")
    if cfg.method.get("name") == "instaflow" and args.export and cfg.method.get("distill_steps", 0) != 1:
        raise ValueError("--export writes a one-step student: it needs an instaflow run with distill_steps: 1 "
                         "(a 2-rectified-flow run's result is its pipeline folder, <output_dir>/pipeline)")
    import time

    t0 = time.perf_counter()
    if cfg.method.get("name") == "instaflow" and "stage1" in cfg.method:
        _run_stage1(cfg, args)
    trainer = Trainer(cfg)
    records = trainer.train()
    minutes = (time.perf_counter() - t0) / 60
    try:
        return _export(args, cfg, trainer, records, minutes) if trainer.acc.is_main_process else 0
    finally:
        trainer.acc.end_training()  # destroys the process group: no C++ abort at exit under torchrun


def _run_stage1(cfg: Any, args: argparse.Namespace) -> None:
    """InstaFlow's ``method.stage1``: point ``cfg``'s teacher at stage 1's exported pipeline, training stage 1
    first when that pipeline folder does not exist (module docstring). All processes call this."""
    from fastgen.distill.instaflow import PIPELINE_DIR
    from fastgen.train import Trainer, load_config

    method = cfg.method
    name = method.pop("stage1")
    if "teacher" in method:
        raise ValueError("give method.stage1 (the 2-rectified-flow config whose pipeline is the teacher) or "
                         "method.teacher, not both")
    if not isinstance(name, str) or not name:
        raise ValueError(f"method.stage1 must name a distill config (name or YAML path), got {name!r}")
    first = load_config(resolve_config(name, "distill"), ["progress=false"] if args.no_progress else [])
    if first.method.get("name") != "instaflow" or first.method.get("distill_steps", 0) != 0 or "stage1" in first.method:
        raise ValueError(f"method.stage1 {name!r} must be an instaflow 2-rectified-flow config (distill_steps: 0, "
                         f"no stage1 of its own)")
    pipeline = Path(first.output_dir) / PIPELINE_DIR
    method["teacher"] = str(pipeline)
    method.setdefault("base_pipeline", first.method.get("teacher"))
    if (pipeline / "model_index.json").is_file():
        print(f"stage 1 ({first.name}): using its pipeline {pipeline}")
        return
    print(f"stage 1 ({first.name}): training the 2-rectified flow first (writes {pipeline})")
    trainer = Trainer(first)
    trainer.train()
    if trainer.acc.is_main_process:
        trainer.method.export(trainer.ema_network("net"), pipeline)
    trainer.acc.wait_for_everyone()


def _export(args: argparse.Namespace, cfg: Any, trainer: Any, records: list[dict], minutes: float) -> int:
    """Main process: write the student (and its zoo copy), evaluate it, print the summary."""
    from fastgen.distill.fdistill import FDistill

    method: FDistill = trainer.method  # type: ignore[assignment]
    if cfg.method.get("name") == "instaflow":
        return _export_instaflow(args, cfg, trainer, records)
    student = trainer.ema_network("student")
    if hasattr(method, "generator"):  # SFD / BOSS: the trained denoiser sampled on its few-step grid
        student = method.generator(student)
    meta = {
        "config": args.config,
        "overrides": list(args.overrides),
        "steps": trainer.step,
        "method": cfg.method.get("name"),
        "divergence": getattr(method.config, "divergence", None),
        "minutes_this_invocation": round(minutes, 2),
    }
    fd = None
    if args.eval and (cfg.data.name == "digits" or tuple(getattr(method.config, "sample_shape", ())) == (1, 8, 8)):
        fd = evaluate_digits(student, method, args.eval, seed=cfg.seed)
        meta["fd_digits_test"] = fd
    out = save_and_export(student, method, Path(cfg.output_dir) / "student", args.export, meta)
    msg = f"distilled {cfg.name} to step {trainer.step} ({_losses(records)}); student: {out}"
    print(msg + (f"; FD_digits(test) = {fd:.4g}" if fd is not None else ""))
    return 0


def _export_instaflow(args: argparse.Namespace, cfg: Any, trainer: Any, records: list[dict]) -> int:
    """InstaFlow: the run's pipeline folder; for a one-step run also the one-step student (and its zoo copy)."""
    from fastgen.distill.instaflow import PIPELINE_DIR

    method, net = trainer.method, trainer.ema_network("net")
    folder = method.export(net, Path(cfg.output_dir) / PIPELINE_DIR)
    msg = f"distilled {cfg.name} to step {trainer.step} ({_losses(records)}); pipeline (EMA weights): {folder}"
    if method.distill_steps == 1:
        meta = {"config": args.config, "overrides": list(args.overrides), "steps": trainer.step,
                "method": "instaflow", "teacher": str(method.teacher_path)}
        out = save_and_export(method.one_step_student(net), method, Path(cfg.output_dir) / "student", args.export,
                              meta)
        msg += f"; one-step student: {out}"
    print(msg)
    return 0


def _losses(records: list[dict]) -> str:
    last = records[-1] if records else {}
    return ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith("loss/"))


def evaluate_digits(student, method, n: int, seed: int = 0) -> float:
    """FD_digits (test split) of ``n`` one-step samples with uniformly cycling class labels."""
    import torch

    from fastgen.metrics import digits_fd

    g = torch.Generator().manual_seed(seed + 12345)
    labels = torch.arange(n) % 10 if method.class_conditional else None
    dev = next(student.parameters()).device
    with torch.no_grad():
        z = torch.randn((n, *method.config.sample_shape), generator=g).to(dev)
        x = student(z, None if labels is None else labels.to(dev)).cpu()
    return float(digits_fd(x.reshape(n, 1, 8, 8).clamp(-1, 1)))


def save_and_export(student, method, path: Path, export: str | None, meta: dict) -> Path:
    """Save the student next to the run (weights as trained) and optionally into the zoo folder as ``export``
    (float16 weights, as the zoo ships them)."""
    from fastgen.distill.student import save_student

    def write(target: Path, zoo: bool = False):
        if hasattr(method, "save_student"):  # few-step students (SFD, BOSS) write their own grid
            return method.save_student(student, target, meta, half=zoo)
        shape = method.sample_shape if hasattr(method, "sample_shape") else method.config.sample_shape
        return save_student(student, target, shape, meta, half=zoo)[0]

    weights = write(path)
    if export:
        from fastgen.models.zoo import WEIGHTS_DIR

        write(WEIGHTS_DIR / export, zoo=True)
    return weights
