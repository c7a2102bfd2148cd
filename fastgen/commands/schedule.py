"""``fastgen schedule {ays,ld3,dp,auto,show}``: optimise a sampling schedule and write it as JSON.

Examples::

    fastgen schedule ays --published sd15 --steps 20 --out ays_sd15_20.json
    fastgen schedule ays --model digits-empirical --solver dpmpp_2m --nfe 6 --out ays.json
    fastgen schedule ld3 --model digits-edm --solver dpmpp_2m --nfe 6 --out ld3.json
    fastgen schedule dp --model ring-mixture --solver ipndm --nfe 4 6 8 --out dp_{nfe}.json
    fastgen schedule auto --model ring-mixture --nfe 6 --out best6.json
    fastgen schedule auto --model ring-mixture --nfe 4 --methods karras,dp,ld3,learned --out learned4.json
    fastgen schedule show ld3.json

Models (``--model``): anything :func:`fastgen.models.load_model` serves that has a denoiser (zoo
teachers such as ``digits-edm``, training runs, local Diffusers pipeline folders of every family,
mixture specs such as ``ring-mixture``), plus ``digits-empirical`` (the exact denoiser of the 898
train digits with kernel width 0.25, a smooth stand-in). Text pipelines take ``--prompt``/``--prompts
FILE`` (cycled over the noises; encoded once, detached). AYS needs data: the digits for ``digits-*`` zoo
models, mixture samples for mixtures, otherwise samples of the model itself (Heun, 32 steps). The
written JSON is a :class:`fastgen.samplers.schedule.Schedule` that records the model identity and sigma
range (``meta.model_identity``), usable with ``FastgenScheduler.from_config(..., schedule=PATH)``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

MODELS = ("digits-edm", "digits-empirical", "ring-mixture")  # examples; any load_model source works


@dataclass
class TestBed:
    """A denoiser with data and conditioning for schedule search (see :func:`load_testbed`)."""

    name: str
    denoiser: Any
    data: torch.Tensor | None  # (N, ...) samples of the data distribution (AYS); None: drawn on demand
    labels: torch.Tensor | None  # (N,) class labels of ``data`` or None
    shape: tuple[int, ...]  # per-sample shape
    num_classes: int | None  # class-conditional models: labels drawn uniformly
    dtype: torch.dtype
    model: Any = None  # the LoadedModel (None for digits-empirical)
    prompts: list[str] | None = None
    guidance: float = 1.0  # the CFG scale ``denoiser`` already applies (1: the conditional model itself)
    guidance_interval: tuple[float, float] | None = None  # the sigmas that CFG applies at (None: all)

    def noise(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` unit Gaussian noises and (for class-conditional models) uniform random labels."""
        z = torch.randn(n, *self.shape, generator=generator, dtype=torch.float64).to(self.dtype)
        labels = None
        if self.num_classes is not None:
            labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        return z, labels

    def cond(self, n: int) -> dict[str, Any]:
        """Prompt conditions for ``n`` noises (text models; computed once under no_grad, detached)."""
        if self.model is None or self.model.conditioning != "prompt":
            if self.prompts is not None:
                raise ValueError(f"--prompt/--prompts do not apply to {self.name} (it takes no prompts)")
            return {}
        return self.model.condition(n, prompts=self.prompts)[0]

    def identity(self) -> dict[str, Any] | None:
        return None if self.model is None else self.model.identity()


def load_testbed(name: str, bandwidth: float = 0.25, prompts: list[str] | None = None, guidance: float = 1.0,
                 negative_prompt: str | None = None,
                 guidance_interval: tuple[float, float] | None = None) -> TestBed:
    """Build the test bed of ``name`` (``digits-empirical`` or any :func:`load_model` source).

    ``guidance != 1`` makes the bed's denoiser the CFG denoiser ``D_u + w (D_c - D_u)`` (DiT convention) of a
    conditional model, so a schedule is learned for the ODE that is sampled at that scale; the unconditional
    branch is the empty prompt (or ``negative_prompt``) for text models and the null class for class models.
    ``guidance_interval`` ``(sigma_lo, sigma_hi)`` limits CFG to those sigmas (the conditional model elsewhere).
    """
    from fastgen.samplers.guidance import check_interval

    guidance_interval = check_interval(guidance_interval, "--guidance-interval")
    if guidance_interval is not None and guidance == 1.0:
        raise ValueError("--guidance-interval needs --guidance != 1 (at 1 no guidance is applied anywhere)")
    bed = _load_testbed(name, bandwidth, prompts)
    if guidance == 1.0 and negative_prompt is None:
        return bed
    if bed.model is None:
        raise ValueError(f"--guidance/--negative-prompt do not apply to {name} (an unconditional stand-in)")
    if guidance == 1.0:
        raise ValueError("--negative-prompt needs --guidance != 1 (at 1 the unconditional branch is not used)")
    if negative_prompt is not None and bed.model.conditioning != "prompt":
        raise ValueError(f"--negative-prompt applies to text-to-image models; {name} takes "
                         f"{bed.model.conditioning} conditioning")
    from fastgen.samplers.guidance import cfg

    first = None if bed.model.conditioning != "prompt" else (bed.prompts or [""])[:1]
    # condition() validates the scale and the model's conditioning; uncond holds ONE row, expanded per call.
    _, uncond = bed.model.condition(1, prompts=first, negative_prompt=negative_prompt, guidance=guidance)
    bed.denoiser = cfg(bed.denoiser, guidance, uncond, interval=guidance_interval)
    bed.guidance, bed.guidance_interval = guidance, guidance_interval
    return bed


def _load_testbed(name: str, bandwidth: float, prompts: list[str] | None) -> TestBed:
    from fastgen.core.analytic import EmpiricalDenoiser
    from fastgen.data import load_digits_split
    from fastgen.models import load_model

    if name == "digits-empirical":
        data = load_digits_split("train").images.double()
        return TestBed(name, EmpiricalDenoiser(data, bandwidth=bandwidth), data, None, (1, 8, 8), None,
                       torch.float64, prompts=prompts)
    m = load_model(name)
    if m.denoiser is None or m.kind in ("student", "shortcut"):
        raise ValueError(f"--model {name}: a {m.kind} model has no ODE to schedule; give a teacher, a pipeline "
                         "folder or a mixture")
    ident = m.identity()["name"]
    if m.kind == "exact":
        mix = m.info["mixture"]
        data, _ = mix.sample(4096, torch.Generator().manual_seed(0), dtype=torch.float64)
        return TestBed(ident, m.denoiser, data, None, m.shape, None, torch.float64, m, prompts)
    data = labels = None
    if ident.startswith("digits-") and m.shape == (1, 8, 8) and name == ident:
        digits = load_digits_split("train")
        data, labels = digits.images.float(), digits.labels
    return TestBed(ident, m.denoiser, data, labels, m.shape, m.num_classes, torch.float32, m, prompts)


def _model_samples(bed: TestBed, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AYS data for models without a data set: ``n`` samples of the model itself (Heun, 32 steps)."""
    from fastgen.core.schedules import karras
    from fastgen.core.solvers import heun

    z, labels = bed.noise(n, generator)
    sig = karras(32, bed.model.sigma_min, bed.model.sigma_max).to(bed.dtype)
    cond = {**bed.cond(n), **({} if labels is None else {"class_labels": labels})}
    with torch.no_grad():
        return heun(bed.denoiser, z * sig[0], sig, **cond), labels


def _common(p: argparse.ArgumentParser, multi_nfe: bool = False, solver: bool = True) -> None:
    from fastgen.samplers.guidance import GUIDANCE_INTERVAL_HELP

    p.add_argument("--model", default="digits-empirical",
                   help=f"{', '.join(MODELS)}, or any load_model source: zoo/pipeline name, run dir, pipeline folder")
    if solver:
        p.add_argument("--solver", default="dpmpp_2m",
                       help="euler | heun | dpmpp_2m | ipndm | unipc | unipc3 (default dpmpp_2m)")
    if multi_nfe:
        p.add_argument("--nfe", type=int, nargs="+", default=[6], help="NFE budget(s), one schedule each")
    else:
        p.add_argument("--nfe", type=int, default=6, help="denoiser calls incl. the final step to 0 (default 6)")
    p.add_argument("--sigma-min", type=float, default=None, help="smallest positive sigma (VE; default model's)")
    p.add_argument("--sigma-max", type=float, default=None, help="largest sigma (VE; default model's or 80)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--out", required=True, help="output JSON path" + (" ('{nfe}' is replaced)" if multi_nfe else ""))
    p.add_argument("--prompt", action="append", default=None, help="text pipelines: a prompt (repeatable)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="text pipelines: prompts, one per line")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale the schedule is learned for (conditional models; default 1 = no guidance)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=GUIDANCE_INTERVAL_HELP)
    p.add_argument("--negative-prompt", default=None, help="text pipelines with --guidance: the unconditional prompt")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("schedule", help="optimise a sampling schedule (AYS, LD3, DP) or show one",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="method", metavar="METHOD", required=True)

    p = sub.add_parser("ays", help="Align Your Steps: published schedules or the KLUB optimizer")
    p.add_argument("--published", default=None, choices=("sd15", "sdxl", "svd"),
                   help="write the published schedule of this model instead of optimising")
    p.add_argument("--steps", type=int, default=10, help="steps for --published (default 10)")
    p.add_argument("--terminal", default="keep", choices=("keep", "append", "replace"),
                   help="for --published: keep the published minimum, append 0 or replace it by 0")
    p.add_argument("--iterations", type=int, default=4, help="coordinate sweeps per level (default 4)")
    p.add_argument("--samples", type=int, default=256, help="Monte Carlo samples per KLUB estimate")
    p.add_argument("--subdivisions", type=int, default=0, help="2x subdivisions after the first level")
    p.add_argument("--val-noise", type=int, default=32,
                   help="noises for early stopping by ODE error at --solver/--nfe (0: keep the last sweep)")
    _common(p)
    p.set_defaults(func=_run_ays)

    p = sub.add_parser("ld3", help="LD3: learn the schedule by backpropagating through the solver")
    p.add_argument("--num-noise", type=int, default=100, help="noises, split 50/50 train/validation")
    p.add_argument("--iterations", type=int, default=150, help="maximum iterations (default 150)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="Heun steps of the teacher (default: adaptive dopri5 reference ODE)")
    p.add_argument("--no-decoupled", action="store_true", help="do not learn evaluation offsets")
    p.add_argument("--init", default="auto", choices=("auto", "loglinear", "karras", "flow"),
                   help="starting schedule: loglinear (LD3's), karras, flow (uniform in flow time) or auto "
                        "(default: flow for flow-matching pipelines, loglinear otherwise)")
    _common(p)
    p.set_defaults(func=_run_ld3)

    p = sub.add_parser("dp", help="GITS/BOSS dynamic programming over a fine grid")
    p.add_argument("--num-noise", type=int, default=128, help="teacher trajectories (default 128)")
    p.add_argument("--grid-size", type=int, default=40, help="fine grid intervals K (default 40)")
    p.add_argument("--grid", default="auto", choices=("auto", "karras", "loglinear", "flow"),
                   help="how the fine grid is spaced: karras (rho 7), loglinear, flow (uniform in flow time) or "
                        "auto (default: flow for flow-matching pipelines, karras otherwise)")
    p.add_argument("--coeff", default="auto", help="GITS coefficient (1.0 = BOSS) or 'auto' (default)")
    p.add_argument("--metric", default="mse,abs_dev",
                   help="cost metric(s), comma-separated: mse, abs_dev (fastgen's defaults), or GITS' own l2, l1, dev")
    _common(p, multi_nfe=True)
    p.set_defaults(func=_run_dp)

    p = sub.add_parser("auto", help="the best solver + schedule for --model at --nfe by held-out trajectory error")
    p.add_argument("--solvers", default=None,
                   help="comma-separated solvers to try (default: every fastgen solver)")
    p.add_argument("--methods", default="karras,loglinear,dp,ld3",
                   help="comma-separated schedule kinds: karras, loglinear, dp, ld3, learned (default all but "
                        "learned; ld3 starts from dp; learned: schedule + multistep coefficients fitted from the "
                        "best candidates)")
    p.add_argument("--num-noise", type=int, default=64, help="noises the optimisers fit on (default 64)")
    p.add_argument("--held-out", type=int, default=64, help="other noises every candidate is scored on (default 64)")
    p.add_argument("--grid-size", type=int, default=40, help="DP fine grid intervals K (default 40)")
    p.add_argument("--grid", default="auto", choices=("auto", "karras", "loglinear", "flow"),
                   help="DP fine grid spacing (default auto: flow for flow-matching pipelines, karras otherwise)")
    p.add_argument("--ld3-iterations", type=int, default=60, help="LD3 iterations per solver (default 60)")
    p.add_argument("--learned-iterations", type=int, default=None,
                   help="learned-solver iterations of every option set per starting candidate (default: the "
                        "library's, 150 and 300 for its two option sets)")
    p.add_argument("--learned-bases", type=int, default=3,
                   help="learned solvers start from the best candidate of this many one-call solvers (default 3)")
    _common(p, solver=False)
    p.set_defaults(func=_run_auto)

    p = sub.add_parser("show", help="print a schedule JSON")
    p.add_argument("file", help="schedule JSON path")
    p.set_defaults(func=_run_show)


def _cond(labels: torch.Tensor | None) -> dict[str, Any]:
    return {} if labels is None else {"class_labels": labels}


def _check_common(args: argparse.Namespace, exact_nfe: bool = False) -> None:
    """Refuse an unknown --solver, an unwritable --out and (``exact_nfe``: DP, whose schedules take exactly
    ``steps_for_nfe`` steps) an NFE the solver cannot make, before any work."""
    from fastgen.core.solvers import SOLVERS, steps_for_nfe
    from fastgen.io.paths import check_output_path

    if args.solver not in SOLVERS:
        raise ValueError(f"--solver must be one of {', '.join(sorted(SOLVERS))}, got {args.solver!r}")
    for n in (args.nfe if isinstance(args.nfe, list) else [args.nfe]) if exact_nfe else []:
        try:
            steps_for_nfe(args.solver, n)
        except ValueError as err:
            raise ValueError(f"--nfe {n} with --solver {args.solver}: {err}") from None
    check_output_path(args.out.replace("{nfe}", "0"), "--out")


def _bed(args: argparse.Namespace) -> TestBed:
    from fastgen.commands.sample import _prompts

    return load_testbed(args.model, prompts=_prompts(args), guidance=args.guidance,
                        negative_prompt=args.negative_prompt, guidance_interval=args.guidance_interval)


def _range(args: argparse.Namespace, bed: TestBed) -> tuple[float | None, float | None]:
    """The schedule's sigma range: the flags, else the model's own (None: the optimiser's default)."""
    lo, hi = args.sigma_min, args.sigma_max
    if bed.model is not None:
        lo = bed.model.sigma_min if lo is None else lo
        hi = bed.model.sigma_max if hi is None else hi
    return lo, hi


def _finish(sched: Any, out: str, bed: TestBed | None = None) -> int:
    from fastgen.io.paths import check_output_path

    check_output_path(out, "--out")
    if bed is not None and bed.identity() is not None:
        sched.meta["model_identity"] = bed.identity()
        sched.meta["model_sigma_range"] = list(bed.model.sigma_range)
        sched.meta["guidance"] = bed.guidance
        if bed.guidance_interval is not None:
            sched.meta["guidance_interval"] = list(bed.guidance_interval)
    path = sched.save(out)
    print(sched.summary())
    print(f"wrote {path}")
    return 0


def _run_ays(args: argparse.Namespace) -> int:
    from fastgen.samplers.ays import ays_schedule, for_solver, optimize_ays

    if args.published is not None:
        sched = ays_schedule(args.published, args.steps)
        if args.terminal != "keep":
            sched.sigmas = sched.solver_sigmas(args.terminal)
            sched.meta["terminal"] = args.terminal
        return _finish(sched, args.out)
    _check_common(args)
    bed = _bed(args)
    if bed.cond(1):
        raise ValueError(f"--model {args.model}: AYS is not served for text-to-image models yet; use ld3 or dp")
    g = torch.Generator().manual_seed(args.seed)
    data, labels = bed.data, bed.labels
    if data is None:
        data, labels = _model_samples(bed, max(args.samples, 64), g)
    lo, hi = _range(args, bed)
    knots = optimize_ays(bed.denoiser, data, sigma_min=lo, sigma_max=hi,
                         iterations=args.iterations, num_samples=args.samples, subdivisions=args.subdivisions,
                         solver=args.solver, nfe=args.nfe, val_noise=args.val_noise, class_labels=labels,
                         generator=g, progress=not args.no_progress, model_id=bed.name)
    sched = for_solver(knots, args.solver, args.nfe)
    sched.meta["knots"] = [float(v) for v in knots.sigmas]
    return _finish(sched, args.out, bed)


def _run_ld3(args: argparse.Namespace) -> int:
    from fastgen.samplers.ld3 import learn_ld3

    _check_common(args)
    bed = _bed(args)
    g = torch.Generator().manual_seed(args.seed)
    noise, labels = bed.noise(args.num_noise, g)
    lo, hi = _range(args, bed)
    init: Any = args.init if args.init != "auto" else ("flow" if _is_flow(bed) else "loglinear")
    if init == "flow":
        from fastgen.core.schedules import flow_uniform
        from fastgen.samplers.ld3 import ld3_steps

        # the pipeline's own spacing (FlowMatch at shift 1): t uniform from t(sigma_max) down to one step above
        # t(sigma_min), then 0 (so the last step is not spent on [sigma_min, 0])
        steps = ld3_steps(args.solver, args.nfe)
        full = flow_uniform(steps + 1, lo, hi)
        init = torch.cat([full[:steps], full.new_zeros(1)])
    sched = learn_ld3(bed.denoiser, noise, solver=args.solver, nfe=args.nfe, sigma_min=lo, init=init,
                      sigma_max=hi, iterations=args.iterations, teacher_steps=args.teacher_steps,
                      decoupled=not args.no_decoupled, class_labels=labels, generator=g,
                      progress=not args.no_progress, model_id=bed.name, **bed.cond(args.num_noise))
    return _finish(sched, args.out, bed)


def _run_dp(args: argparse.Namespace) -> int:
    from fastgen.samplers.dp import dp_schedules

    if len(args.nfe) > 1 and "{nfe}" not in args.out:
        raise ValueError("--out must contain '{nfe}' when several --nfe values are given")
    coeff: Any = args.coeff
    if coeff != "auto":
        try:
            coeff = [float(c) for c in coeff.split(",")]
        except ValueError as err:
            raise ValueError(f"--coeff must be 'auto' or comma-separated numbers, got {args.coeff!r}") from err
    _check_common(args, exact_nfe=True)
    bed = _bed(args)
    g = torch.Generator().manual_seed(args.seed)
    noise, labels = bed.noise(args.num_noise, g)
    lo, hi = _range(args, bed)
    scheds = dp_schedules(bed.denoiser, noise, args.nfe, solver=args.solver, grid_size=args.grid_size,
                          grid=_grid(args, bed),
                          sigma_min=lo, sigma_max=hi, metric=args.metric.split(","), coeff=coeff,
                          class_labels=labels, progress=not args.no_progress, model_id=bed.name,
                          **bed.cond(args.num_noise))
    for nfe, sched in scheds.items():
        _finish(sched, args.out.replace("{nfe}", str(nfe)), bed)
    return 0


def _is_flow(bed: TestBed) -> bool:
    """True for a Diffusers flow-matching pipeline (its scheduler config is a FlowMatch one)."""
    from fastgen.core.schedules import is_flow_config

    scheduler = (bed.model.config.get("scheduler") if bed.model is not None else None) or {}
    return bool(scheduler) and is_flow_config(scheduler)


def _grid(args: argparse.Namespace, bed: TestBed) -> str:
    """``--grid``; ``auto``: ``flow`` for a flow-matching pipeline (its trajectories bend in flow time, where
    Karras' rho 7 over [0.001, 1000] spends half its points above t = 0.95), ``karras`` otherwise."""
    if args.grid != "auto":
        return args.grid
    return "flow" if _is_flow(bed) else "karras"


def _names(text: str | None, allowed: Any, flag: str) -> list[str] | None:
    """``--solvers``/``--methods``: a comma-separated subset of ``allowed`` (None: all)."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in allowed]
    if bad or not names:
        raise ValueError(f"{flag} must be a comma-separated subset of {', '.join(allowed)}, got {text!r}")
    return names


def _run_auto(args: argparse.Namespace) -> int:
    from fastgen.core.solvers import SOLVERS
    from fastgen.io.paths import check_output_path
    from fastgen.samplers.auto import DEFAULT_LEARNED_OPTIONS, METHODS, auto_schedule
    from fastgen.samplers.ld3 import LD3Options

    solvers = _names(args.solvers, list(SOLVERS), "--solvers")
    methods = _names(args.methods, METHODS, "--methods")
    for flag, v in (("--nfe", args.nfe), ("--num-noise", args.num_noise), ("--held-out", args.held_out),
                    ("--ld3-iterations", args.ld3_iterations), ("--learned-bases", args.learned_bases),
                    ("--learned-iterations", args.learned_iterations)):
        if v is not None and v < (2 if flag in ("--num-noise", "--held-out") else 1):  # None: the library's
            raise ValueError(f"{flag} must be >= {2 if flag in ('--num-noise', '--held-out') else 1}, got {v}")
    check_output_path(args.out, "--out")
    bed = _bed(args)
    g = torch.Generator().manual_seed(args.seed)
    noise, labels = bed.noise(args.num_noise, g)
    held, held_labels = bed.noise(args.held_out, g)
    lo, hi = _range(args, bed)
    best = auto_schedule(bed.denoiser, args.nfe, noise, held, solvers=solvers, methods=methods,
                         sigma_min=lo, sigma_max=hi, dp_options={"grid_size": args.grid_size, "grid": _grid(args, bed)},
                         ld3_options=LD3Options(iterations=args.ld3_iterations),
                         learned_options=None if args.learned_iterations is None else
                         [replace(v, iterations=args.learned_iterations) for v in DEFAULT_LEARNED_OPTIONS],
                         learned_bases=args.learned_bases, generator=g, model_id=bed.name,
                         held_out_cond={**bed.cond(args.held_out), **_cond(held_labels)},
                         **bed.cond(args.num_noise), **_cond(labels))
    info = best.meta["auto"]
    for solver, method, err in info["ranking"][:5]:
        print(f"  {solver:>9} {method:<10} held-out RMSE {err:.5f}")
    return _finish(best, args.out, bed)


def _run_show(args: argparse.Namespace) -> int:
    from fastgen.samplers.schedule import Schedule

    print(Schedule.load(Path(args.file)).summary())
    return 0
