"""``fastgen train NAME|CONFIG [--set key=value ...]``: run a training config with fastgen's trainer.

Multi-process: ``accelerate launch --num_processes 2 [--cpu] -m fastgen.cli train CONFIG``.
"""

from __future__ import annotations

import argparse

from fastgen.commands._configs import add_config_arguments, resolve_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a shipped config NAME or a YAML path: EDM / flow teachers (optionally with "
        "DDPM-IP input perturbation), shortcut, GFT, reflow (2-rectified flow and its one-step distillation)",
        description="Train with fastgen's accelerate trainer. The run directory (output_dir) receives "
        "config.yaml, metrics.jsonl and checkpoints/; re-running resumes from the latest checkpoint.",
    )
    add_config_arguments(p, "train", "digits-edm")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import fastgen.distill  # noqa: F401  (registers the "fdistill" method)
    from fastgen.train import Trainer, load_config

    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    cfg = load_config(resolve_config(args.config, "train"), overrides)
    trainer = Trainer(cfg)
    try:
        records = trainer.train()
    finally:
        trainer.acc.end_training()  # destroys the process group: no C++ abort at exit under torchrun
    if trainer.acc.is_main_process and hasattr(trainer.method, "export"):  # instaflow: a Diffusers pipeline folder
        from pathlib import Path

        from fastgen.distill.instaflow import PIPELINE_DIR

        folder = trainer.method.export(trainer.ema_network("net"), Path(cfg.output_dir) / PIPELINE_DIR)
        print(f"pipeline (EMA weights): {folder}")
    if trainer.acc.is_main_process:
        last = records[-1] if records else {}
        losses = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith("loss/"))
        print(f"trained {cfg.name} to step {trainer.step} ({losses}); checkpoints in {trainer.ckpt_root}")
    return 0
