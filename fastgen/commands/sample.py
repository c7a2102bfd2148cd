"""``fastgen sample``: sample any model :func:`fastgen.models.load_model` serves, with any sampler and schedule.

``--model`` is a zoo name, a shipped pipeline name, a training run / checkpoint, an exported student, a
local Diffusers pipeline folder or a mixture spec. Text pipelines take ``--prompt`` (repeatable) or
``--prompts FILE`` (one per line), ``--negative-prompt`` and ``--guidance``; class-conditional models take
``--class-label``. An option that does not apply to the model is an error (exit 2). The printed JSON (and
``samples.json`` next to the PNGs, or the ``.npz``) records the model identity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fastgen.commands._generate import NAMED_SCHEDULES, SAMPLERS, SampleSpec, default_sampler, iter_generate
from fastgen.io.paths import check_output_path
from fastgen.io.streams import NpzStreamWriter, PngStreamWriter
from fastgen.models import load_model


def register(sub: argparse._SubParsersAction) -> None:
    from fastgen.samplers.guidance import GUIDANCE_INTERVAL_HELP

    p = sub.add_parser(
        "sample",
        help="sample a model (zoo name, run, student, Diffusers pipeline folder, mixture)",
        description="Sample any model fastgen can load, with any sampler and schedule; seeded and reproducible.",
    )
    p.add_argument("--model", default="digits-edm",
                   help="zoo/pipeline name, run dir or checkpoint, student, pipeline folder, or NAME-mixture")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="default: heun for denoisers, shortcut / student for those models")
    p.add_argument("--schedule", default="karras", help=f"one of {', '.join(NAMED_SCHEDULES)} or a schedule JSON")
    p.add_argument("--allow-schedule-range", action="store_true",
                   help="run a schedule whose sigmas leave the model's sigma range (experts)")
    p.add_argument("--steps", type=int, default=10, help="solver steps (Heun: NFE = 2*steps - 1)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG weight w (1 = conditional; GFT: beta = 1/w)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=GUIDANCE_INTERVAL_HELP)
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--class-label", default=None, help="class-conditional models: a class index or 'cycle'")
    p.add_argument("--prompt", action="append", default=None, help="text pipelines: a prompt (repeatable)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="text pipelines: a file of prompts, one per line")
    p.add_argument("--negative-prompt", default=None, help="text pipelines: the prompt of the unconditional pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="samples", help="a folder for PNGs, or a path ending in .npz")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _prompts(args: argparse.Namespace) -> list[str] | None:
    if args.prompt and args.prompts:
        raise ValueError("give --prompt or --prompts FILE, not both")
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts file not found: {str(path)!r}")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"--prompts file {str(path)!r} holds no prompt (one per line)")
        return lines
    return args.prompt


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.device)
    prompts = _prompts(args)
    if args.class_label is not None and model.conditioning != "class":
        raise ValueError(f"--class-label does not apply to {args.model} (conditioning: {model.conditioning})")
    if (prompts is not None or args.negative_prompt is not None) and model.conditioning != "prompt":
        raise ValueError(f"--prompt/--prompts/--negative-prompt do not apply to {args.model} "
                         f"(conditioning: {model.conditioning})")
    spec = SampleSpec(sampler=args.sampler, schedule=args.schedule, steps=args.steps, guidance=args.guidance,
                      class_label=args.class_label or "cycle", prompts=prompts,
                      negative_prompt=args.negative_prompt, allow_schedule_range=args.allow_schedule_range,
                      guidance_interval=args.guidance_interval)
    out = Path(args.out)
    check_output_path(out, "--out", kind="file" if out.suffix == ".npz" else "folder")
    batches = iter_generate(model, spec, args.num, seed=args.seed, batch_size=args.batch_size,
                            device=args.device, progress=not args.no_progress)
    first, nfe = next(batches)  # samples are streamed to disk batch by batch: memory is constant in --num
    record = {"model": model.name, "identity": model.identity(), "kind": model.kind,
              "sampler": spec.sampler or default_sampler(model), "nfe": nfe, "num": int(args.num),
              "shape": list(first.shape[1:]), "out": str(out)}
    if out.suffix == ".npz":
        ident = {"identity": np.array(json.dumps(record["identity"]))}
        with NpzStreamWriter(out, args.num, tuple(first.shape[1:]), extra=ident) as w:
            w.write(first.clamp(-1, 1))
            for x, _ in batches:
                w.write(x.clamp(-1, 1))
    elif first.ndim == 4:
        with PngStreamWriter(out) as w:
            w.write(first.clamp(-1, 1))
            for x, _ in batches:
                w.write(x.clamp(-1, 1))
        (out / "samples.json").write_text(json.dumps(record, indent=1) + "\n")
    else:
        raise ValueError(f"{args.model} makes {tuple(first.shape[1:])}-shaped samples, not images: "
                         "use --out PATH.npz")
    print(json.dumps(record))
    return 0
