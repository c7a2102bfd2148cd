"""Pieces shared by the schedule optimisers (AYS, LD3, DP): sigma range, condition split, patience."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["resolve_sigma_range", "split_cond", "Patience"]


def resolve_sigma_range(denoiser: Any, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    """The schedule's VE sigma range: the given ends, else the denoiser's ``sigma_min``/``sigma_max``
    attributes, else [0.002, 80]. ValueError if not ``0 < lo < hi < inf`` or outside the model's range."""
    m_lo, m_hi = getattr(denoiser, "sigma_min", None), getattr(denoiser, "sigma_max", None)
    lo = float(sigma_min if sigma_min is not None else (m_lo if m_lo is not None else 0.002))
    hi = float(sigma_max if sigma_max is not None else (m_hi if m_hi is not None else 80.0))
    if not (0 < lo < hi) or not math.isfinite(hi):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={lo}, sigma_max={hi}")
    if m_lo is not None and lo < float(m_lo) * (1 - 1e-6):
        raise ValueError(f"sigma_min={lo:.6g} is below the model's sigma_min={float(m_lo):.6g}")
    if m_hi is not None and hi > float(m_hi) * (1 + 1e-6):
        raise ValueError(f"sigma_max={hi:.6g} is above the model's sigma_max={float(m_hi):.6g}")
    return lo, hi


def split_cond(cond: dict[str, Any], n: int, idx: torch.Tensor) -> dict[str, Any]:
    """Rows ``idx`` of every per-sample tensor in ``cond`` (leading dimension ``n``); others unchanged."""
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n else v)
            for k, v in cond.items()}


@dataclass
class Patience:
    """Early-stopping bookkeeping: ``update(value)`` returns "best", "ok" or "reduce" (after
    ``patience`` evaluations without a new best, counted from the last best or reduction)."""

    patience: int
    best: float = math.inf
    bad: int = 0

    def update(self, value: float, tol: float = 1e-12) -> str:
        if value < self.best - tol:
            self.best, self.bad = value, 0
            return "best"
        self.bad += 1
        if self.bad >= self.patience:
            self.bad = 0
            return "reduce"
        return "ok"
