"""Training health: the divergence error, the explosion bound, and the optimizer settings (per-optimizer
merge, start-up check, learning-rate schedule)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TrainingDiverged", "validate_optim", "optim_settings", "scheduled_lr", "unhealthy", "DEFAULT_EXPLODE_BOUND"]

DEFAULT_EXPLODE_BOUND = 1e8  # |loss| or pre-clip grad norm beyond this stops the run (optim.explode_bound)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_optim(name: str, o: Mapping[str, Any]) -> None:
    """Refuse optimizer settings that would silently turn training into ascent or overflow."""
    where = f"optim (optimizer {name!r})"
    checks = [
        ("lr", _finite(o["lr"]) and o["lr"] > 0, "a finite number > 0"),
        ("eps", _finite(o["eps"]) and o["eps"] > 0, "a finite number > 0"),
        ("weight_decay", _finite(o["weight_decay"]) and o["weight_decay"] >= 0, "a finite number >= 0"),
        ("betas", len(o["betas"]) == 2 and all(_finite(b) and 0 <= b < 1 for b in o["betas"]),
         "two numbers in [0, 1)"),
        ("grad_clip", o["grad_clip"] is None or (_finite(o["grad_clip"]) and o["grad_clip"] > 0),
         "a finite number > 0 or null"),
        ("explode_bound", o["explode_bound"] is None or (_finite(o["explode_bound"]) and o["explode_bound"] > 0),
         "a finite number > 0 or null"),
        ("final_lr_ratio", _finite(o["final_lr_ratio"]) and o["final_lr_ratio"] >= 0, "a finite number >= 0"),
    ]
    for key, ok, accepted in checks:
        if not ok:
            raise ValueError(f"{where}: {key} must be {accepted}, got {o[key]!r}")


def optim_settings(o: Any, name: str) -> dict[str, Any]:
    """The settings of optimizer ``name``: the ``optim`` section (an ``OptimConfig``) overridden by
    ``optim.groups[name]``, validated (:func:`validate_optim`)."""
    base = {"lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay,
            "warmup_steps": o.warmup_steps, "grad_clip": o.grad_clip, "decay_start": o.decay_start,
            "decay_end": o.decay_end, "final_lr_ratio": o.final_lr_ratio,
            "explode_bound": getattr(o, "explode_bound", DEFAULT_EXPLODE_BOUND)}
    over = dict(o.groups.get(name, {}))
    unknown = sorted(set(over) - set(base))
    if unknown:
        raise ValueError(f"optim.groups.{name}: unknown key(s) {unknown}; accepted: {sorted(base)}")
    base.update(over)
    validate_optim(name, base)
    return base


def scheduled_lr(o: Mapping[str, Any], step: int) -> float:
    """The learning rate at (0-based) ``step`` for settings ``o``: linear warm-up over ``warmup_steps``,
    constant, then an optional linear decay between ``decay_start`` and ``decay_end`` to
    ``lr * final_lr_ratio``."""
    w = int(o["warmup_steps"])
    lr = float(o["lr"]) * (min(1.0, (step + 1) / w) if w > 0 else 1.0)
    a, b = o["decay_start"], o["decay_end"]
    if a is not None and b is not None and step > a:
        frac = min(1.0, (step - a) / (b - a))
        lr *= 1.0 - frac * (1.0 - float(o["final_lr_ratio"]))
    return lr


def unhealthy(losses: Mapping[str, float], norms: Mapping[str, float],
              bounds: Mapping[str, float | None]) -> str | None:
    """Why a step must not be applied (a non-finite loss or pre-clip gradient norm, or one beyond its
    optimizer's ``explode_bound``), or None. Keys are optimizer (loss) names."""
    for n, v in losses.items():
        if not math.isfinite(v):
            return f"loss {n!r} is {v}"
    for n, gn in norms.items():
        if not math.isfinite(gn):
            return f"the gradient of loss {n!r} is non-finite (norm {gn})"
    for n, v in losses.items():
        bound = bounds.get(n)
        if bound is None:
            continue
        if abs(v) > bound:
            return f"the run exploded: |loss {n!r}| = {v:.4g} > optim.explode_bound {bound:g}"
        if norms.get(n, 0.0) > bound:
            return f"the run exploded: grad norm of loss {n!r} = {norms[n]:.4g} > optim.explode_bound {bound:g}"
    return None


class TrainingDiverged(FloatingPointError):
    """A loss or gradient became NaN/Inf or exceeded ``optim.explode_bound``; ``step`` is the optimizer
    step, ``checkpoint`` the last good (verified finite) one or None. The CLI exits with code 1."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
