"""``fastgen sample``: sample any model fastgen can load with any sampler and schedule."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fastgen.commands._generate import NAMED_SCHEDULES, SAMPLERS, SampleSpec, default_sampler, generate
from fastgen.commands._models import resolve_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample a model (embedded name, Diffusers pipeline folder, or trainer checkpoint)",
        description="Sample any model fastgen can load, with any sampler and schedule; seeded and reproducible.",
    )
    p.add_argument("--model", default="digits-edm", help="embedded model name, pipeline folder or checkpoint")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="default: heun for denoisers, shortcut / student for those models")
    p.add_argument("--schedule", default="karras", help=f"one of {', '.join(NAMED_SCHEDULES)} or a schedule JSON")
    p.add_argument("--steps", type=int, default=10, help="solver steps (Heun: NFE = 2*steps - 1)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG weight w (1 = conditional; GFT: beta = 1/w)")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--class-label", default="cycle", help="a class index, or 'cycle' through all classes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="samples", help="a folder for PNGs, or a path ending in .npz")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.model, args.device)
    spec = SampleSpec(sampler=args.sampler, schedule=args.schedule, steps=args.steps, guidance=args.guidance)
    label = args.class_label if args.class_label == "cycle" else int(args.class_label)
    samples, nfe = generate(model, spec, args.num, seed=args.seed, batch_size=args.batch_size,
                            class_label=label, device=args.device, progress=not args.no_progress)
    out = Path(args.out)
    if out.suffix == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, samples=samples.clamp(-1, 1).numpy().astype(np.float32))
    else:
        from fastgen.metrics.io import save_image_folder

        save_image_folder(samples.clamp(-1, 1), out)
    print(json.dumps({"model": model.name, "sampler": spec.sampler or default_sampler(model), "nfe": nfe,
                      "num": int(samples.shape[0]), "out": str(out)}))
    return 0
