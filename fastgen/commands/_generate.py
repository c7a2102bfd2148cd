"""One sampling routine behind ``fastgen sample`` and ``fastgen demo``.

:func:`generate` draws ``n`` samples from a :class:`~fastgen.models.LoadedModel` (what
:func:`fastgen.models.load_model` returns) with a named sampler and schedule, seeded, in batches, and
returns them with the number of network calls per sample (NFE; CFG counts two calls per evaluation).
Latent pipelines return decoded images in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastgen.core import schedules
from fastgen.core.solvers import SOLVERS, get_solver
from fastgen.models.sources import LoadedModel, check_schedule_fits

SAMPLERS = ("restart", *SOLVERS, "shortcut", "student")  # every fastgen solver (a schedule JSON names one)
NAMED_SCHEDULES = ("karras", "loglinear", "ays", "ld3", "dp")
SHIPPED_SCHEDULES = Path(__file__).resolve().parent.parent / "models" / "weights" / "schedules"


@dataclass
class SampleSpec:
    """What to sample: sampler name, schedule (name or JSON path), solver steps, CFG weight (and the sigma
    interval it applies in, ``None``: everywhere), and the conditioning inputs (class label or ``"cycle"``,
    prompts, negative prompt); ``allow_schedule_range`` runs a schedule whose sigmas leave the model's range
    (experts only)."""

    sampler: str | None = None
    schedule: str = "karras"
    steps: int = 10
    guidance: float = 1.0
    class_label: str | int | None = "cycle"
    prompts: list[str] | None = None
    negative_prompt: str | None = None
    allow_schedule_range: bool = False
    guidance_interval: tuple[float, float] | None = None


class _Counter(torch.nn.Module):
    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: Any, **cond: Any) -> torch.Tensor:
        self.calls += 1
        return self.inner(x, sigma, **cond)


def shipped_schedule_path(model: str, method: str, solver: str, nfe: int) -> Path:
    """Where a schedule learned for an embedded model is shipped."""
    return SHIPPED_SCHEDULES / model / f"{method}-{solver}-nfe{nfe}.json"


def resolve_schedule(spec: SampleSpec, model: LoadedModel, solver: str):
    """Return ``(sigmas, wrap)`` for an ODE solver: VE sigmas ending in 0 and a denoiser wrapper."""
    from fastgen.samplers.schedule import Schedule

    name = spec.schedule
    if name == "karras":
        return schedules.karras(spec.steps, model.sigma_min, model.sigma_max), None
    if name == "loglinear":
        return schedules.loglinear(spec.steps, model.sigma_min, model.sigma_max), None
    if name in ("ays", "ld3", "dp"):
        from fastgen.core.solvers import nfe as solver_nfe

        nfe = solver_nfe(solver, schedules.karras(spec.steps, 1.0, 2.0))
        path = shipped_schedule_path(Path(model.name).name, name, solver, nfe)
        if not path.is_file():
            raise ValueError(
                f"--schedule {name}: no {name} schedule is shipped for model {model.name!r}, solver {solver!r} "
                f"and NFE {nfe}; learn one with `fastgen schedule {name} ...` and pass the JSON file"
            )
        sched = Schedule.load(path)
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"--schedule {name!r} is neither one of {NAMED_SCHEDULES} nor an existing schedule JSON file"
            )
        sched = Schedule.load(path)
        if sched.model is not None and sched.model != Path(model.name).name:
            raise ValueError(
                f"schedule {str(path)!r} was made for model {sched.model!r}, not {Path(model.name).name!r}; "
                "a schedule is tied to the model it was learned on"
            )
        recorded = (sched.meta.get("model_identity") or {}).get("fingerprint")
        if recorded and recorded != model.identity()["fingerprint"] and not spec.allow_schedule_range:
            raise ValueError(
                f"schedule {str(path)!r} was learned for a model with fingerprint {recorded[:12]}..., not this "
                f"{model.name!r} ({model.identity()['fingerprint'][:12]}...); pass --allow-schedule-range to run it"
            )
        if sched.solver is not None and sched.solver != solver:
            raise ValueError(
                f"schedule {str(path)!r} was learned for solver {sched.solver!r}; run it with "
                f"--sampler {sched.solver} (got {solver!r})"
            )
    sig = sched.solver_sigmas()
    pos = sig[sig > 0]
    check_schedule_fits((float(pos.min()), float(pos.max())), model.sigma_range, spec.allow_schedule_range)
    return sig, sched.wrap


def default_sampler(model: LoadedModel) -> str:
    return {"shortcut": "shortcut", "student": "student"}.get(model.kind, "heun")


def _unconditional_guidance(spec: SampleSpec, model: LoadedModel) -> None:
    if spec.guidance != 1.0 and model.kind != "gft" and model.conditioning == "none":
        raise ValueError(f"--guidance does not apply to {model.name}: it is unconditional (accepted: 1)")


def _check_spec(spec: SampleSpec, model: LoadedModel) -> str:
    sampler = spec.sampler or default_sampler(model)
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if isinstance(spec.steps, bool) or not isinstance(spec.steps, int) or spec.steps < 1:
        raise ValueError(f"--steps must be an integer >= 1, got {spec.steps!r}")
    if spec.guidance < 0:
        raise ValueError(f"--guidance must be >= 0, got {spec.guidance}")
    if spec.guidance_interval is not None:
        from fastgen.samplers.guidance import check_interval

        check_interval(spec.guidance_interval, "--guidance-interval")
        if spec.guidance == 1.0 or model.kind == "gft":
            raise ValueError("--guidance-interval needs CFG: --guidance != 1 on a model with an unconditional "
                             f"branch ({model.name} is a {model.kind} model, --guidance {spec.guidance:g})")
    if model.kind == "student" and sampler != "student":
        raise ValueError(f"{model.name} is a one-step student: use --sampler student (got {sampler!r})")
    if model.kind == "shortcut" and sampler != "shortcut":
        raise ValueError(f"{model.name} is a shortcut model: use --sampler shortcut (got {sampler!r})")
    if sampler in ("shortcut", "student") and model.kind != sampler:
        raise ValueError(f"--sampler {sampler} needs a {sampler} model; {model.name} is a {model.kind} model")
    if model.kind == "shortcut" and spec.guidance != 1.0:
        raise ValueError(f"--guidance does not apply to {model.name}: the shortcut sampler has no CFG (accepted: 1)")
    if model.kind == "student" and spec.guidance != 1.0:
        raise ValueError(f"--guidance does not apply to {model.name}: a one-step student has no CFG (accepted: 1)")
    _unconditional_guidance(spec, model)
    return sampler


#: Most samples one ``fastgen sample`` run makes (the per-sample condition tensors are O(--num)).
MAX_NUM = 10_000_000
_ADVANCE_CHUNK = 1 << 22  # a multiple of 16 (see _noise_batches)


def _noise_batches(n: int, shape: tuple[int, ...], batch_size: int, seed: int
                   ) -> tuple[Iterator[torch.Tensor], torch.Generator]:
    """Noise batches equal to slices of ``torch.randn(n, *shape)`` and the generator left after that draw.

    torch's CPU normal sampler consumes its stream in blocks of 16 values, so when every batch holds a
    multiple of 16 values, drawing batch by batch gives bit-identical noise to one draw of all ``n``
    (without holding it); a second generator is advanced past the ``n`` draws in fixed chunks for the
    sampler's own noise (Restart), as before. Other shapes fall back to the one-shot draw (O(n) memory).
    """
    numel = 1
    for d in shape:
        numel *= int(d)
    last = n - (n - 1) // batch_size * batch_size
    if (batch_size * numel) % 16 or (last * numel) % 16:
        gen = torch.Generator().manual_seed(seed)
        noise_all = torch.randn(n, *shape, generator=gen)
        return (noise_all[i : i + batch_size] for i in range(0, n, batch_size)), gen
    noise_gen = torch.Generator().manual_seed(seed)
    run_gen = torch.Generator().manual_seed(seed)
    left = n * numel
    while left > 0:
        k = min(left, _ADVANCE_CHUNK)
        torch.randn(k, generator=run_gen)
        left -= k
    return (torch.randn(min(batch_size, n - i), *shape, generator=noise_gen) for i in range(0, n, batch_size)), run_gen


@torch.no_grad()
def iter_generate(
    model: LoadedModel,
    spec: SampleSpec,
    n: int,
    seed: int = 0,
    batch_size: int = 256,
    class_label: str | int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Iterator[tuple[torch.Tensor, float]]:
    """Like :func:`generate`, but yields ``(batch of samples, NFE per sample)`` as each batch is made, so a
    caller can stream them to disk; the noise is the same as :func:`generate`'s (same seed, same samples).

    Raises:
        ValueError: bad ``n``/``batch_size`` (names ``--num``/``--batch-size``), ``n > MAX_NUM``.
        FloatingPointError: a batch came out non-finite (names the model and the batch).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--num must be an integer >= 1, got {n!r}")
    if n > MAX_NUM:
        raise ValueError(f"--num {n} is more than {MAX_NUM} samples per run; split it over runs with different --seed")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    sampler = _check_spec(spec, model)
    noise_iter, gen = _noise_batches(n, tuple(model.shape), batch_size, seed)
    label = spec.class_label if class_label is None else class_label
    cond_w = 1.0 if model.kind == "gft" else spec.guidance
    cond_all, uncond_all = model.condition(
        n, class_labels=label if model.conditioning == "class" else None, prompts=spec.prompts,
        negative_prompt=spec.negative_prompt, guidance=cond_w, device="cpu")
    run = _build_runner(model, spec, sampler, gen, device)
    for i in tqdm(range(0, n, batch_size), desc=f"{Path(model.name).name}:{sampler}", disable=not progress,
                  leave=False):
        noise = next(noise_iter).to(device)
        cond = _slice(cond_all, i, batch_size, device)
        uncond = None if uncond_all is None else _slice(uncond_all, i, batch_size, device)
        x, c = run(noise, cond, uncond)
        x = model.decode(x).cpu() if model.latent else x.cpu()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            raise FloatingPointError(
                f"{model.name} ({sampler}) produced NaN/Inf in {bad} of the {x.shape[0]} samples of batch "
                f"{i // batch_size} (samples {i}..{i + x.shape[0] - 1}); check the model's weights; nothing more "
                "is written"
            )
        yield x, c


def generate(
    model: LoadedModel,
    spec: SampleSpec,
    n: int,
    seed: int = 0,
    batch_size: int = 256,
    class_label: str | int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, float]:
    """``n`` samples ``(n, *image shape)`` in [-1, 1] (decoded for latent pipelines) and the NFE per sample.

    ``class_label`` (if given) overrides ``spec.class_label``. Conditions come from
    :meth:`LoadedModel.condition` (computed once, detached). Holds all ``n`` samples: for many, stream
    :func:`iter_generate` instead."""
    out, calls = [], 0.0
    for x, c in iter_generate(model, spec, n, seed, batch_size, class_label, device, progress):
        out.append(x)
        calls = c
    return torch.cat(out), calls


def _slice(cond: dict[str, Any], i: int, b: int, device: str) -> dict[str, Any]:
    return {k: (v[i : i + b].to(device) if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}


def _guided(model: LoadedModel, spec: SampleSpec, den: Any, uncond: dict[str, Any] | None) -> Any:
    """The denoiser with guidance: GFT's one pass (beta = 1/w) or CFG against ``uncond``."""
    if model.kind == "gft":
        from fastgen.samplers.guidance import gft

        return gft(den, w=max(spec.guidance, 1.0))
    if spec.guidance != 1.0:
        from fastgen.samplers.guidance import cfg

        return cfg(den, spec.guidance, uncond, interval=spec.guidance_interval)
    return den


def _build_runner(model: LoadedModel, spec: SampleSpec, sampler: str, gen: torch.Generator, device: str):
    """``run(noise, cond, uncond) -> (x, calls per sample)`` for the chosen sampler."""
    if sampler == "student":  # one-step students: 1 call; few-step students (SFD, BOSS) say how many
        calls = int(getattr(model.generator, "nfe", 1))
        return lambda noise, cond, uncond: (model.generator(noise, cond), calls)
    if sampler == "shortcut":
        from fastgen.samplers.shortcut import check_num_steps, shortcut_sample

        check_num_steps(spec.steps, getattr(model.shortcut, "max_steps", None))
        return lambda noise, cond, uncond: (shortcut_sample(model.shortcut, noise, spec.steps, **cond), spec.steps)

    counter = _Counter(model.denoiser)
    if sampler == "restart":
        from fastgen.samplers.restart import auto_plan, restart_sample

        if spec.schedule != "karras":
            raise ValueError("--sampler restart builds its own Karras grid; use --schedule karras")
        plan = auto_plan(spec.steps, model.sigma_min, model.sigma_max)

        def run_restart(noise: torch.Tensor, cond: dict[str, Any], uncond: dict[str, Any] | None):
            counter.calls = 0
            den = _guided(model, spec, counter, uncond)
            x = restart_sample(den, noise * float(plan.sigmas[0]), plan=plan, generator=gen, **cond)
            return x, counter.calls / 1.0

        return run_restart
    if sampler not in SOLVERS:
        raise ValueError(f"unknown sampler {sampler!r}")
    sig, wrap = resolve_schedule(spec, model, sampler)
    solver = get_solver(sampler)

    def run_ode(noise: torch.Tensor, cond: dict[str, Any], uncond: dict[str, Any] | None):
        counter.calls = 0
        den = _guided(model, spec, counter, uncond)
        wrapped = wrap(den) if wrap is not None else den
        s = sig.to(device=noise.device, dtype=noise.dtype)
        return solver(wrapped, noise * s[0], s, **cond), counter.calls

    return run_ode
