"""f-divergences for f-distill: a registry of pure functions ``f(r)`` and weights ``h(r) = r^2 f''(r)``.

``r = p_teacher / q_student`` is a density ratio (a positive tensor of any shape). For each divergence
``D_f(p || q) = E_q[f(p/q)]`` with ``f`` convex and ``f(1) = 0``; the student's per-sample gradient
is DMD's score difference weighted by ``h(r) = r^2 f''(r)`` (f-distill, Xu, Nie & Vahdat 2025).

=====================  =====================================  ===============
name (aliases)         f(r)                                   h(r)
=====================  =====================================  ===============
reverse_kl (rkl)       -log r                                 1   (DMD/DMD2)
softened_reverse_kl    (r+1) log((r+1)/(2r))                  1/(1+r)
forward_kl (kl, fkl)   r log r                                r
js                     r log r - (r+1) log((r+1)/2)           r/(1+r)
hellinger (sh)         1 - sqrt(r)                            sqrt(r)/4
jeffreys (jf)          (r-1) log r                            1 + r
pearson                (r-1)^2                                2 r^2
neyman                 (1-r)^2 / r                            2 / r
alpha(a)               (r^a - a r - (1-a)) / (a (a-1))        r^a
=====================  =====================================  ===============

Every ``h`` returns a tensor of ``r``'s shape (also the constant one of reverse-KL), so it can be
indexed per sample. Constant factors in ``h`` cancel under f-distill's batch-mean normalisation.

Usage::

    from fastgen.distill import divergences
    div = divergences.get("js")
    w = div.h(r)            # per-sample weights, same shape as r
    divergences.alpha(0.5)  # the alpha family, h = r**0.5
    div.need_r              # False only when h is constant (reverse-KL): f-distill then trains no ratio
    divergences.register_divergence(divergences.Divergence("mine", f, h))   # a new name for configs
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """An f-divergence: ``f(r)`` (convex, ``f(1) = 0``) and its f-distill weight ``h(r) = r^2 f''(r)``.

    ``r`` is a positive tensor (any shape); both functions return a tensor of the same shape and dtype.
    ``constant_h``: ``h`` does not depend on ``r`` (reverse-KL), so f-distill needs no density ratio.
    """

    name: str
    _f: Fn
    _h: Fn
    constant_h: bool = False

    @property
    def need_r(self) -> bool:
        """Whether the f-distill weight needs the density ratio ``r`` (False when ``h`` is constant)."""
        return not self.constant_h

    def f(self, r: torch.Tensor) -> torch.Tensor:
        """The generator function ``f(r)`` elementwise (``r > 0``)."""
        return self._f(torch.as_tensor(r))

    def h(self, r: torch.Tensor) -> torch.Tensor:
        """The weight ``h(r) = r^2 f''(r)`` elementwise (``r > 0``), shaped like ``r``."""
        r = torch.as_tensor(r)
        return self._h(r).expand_as(r).clone() if r.ndim else self._h(r)

    def __repr__(self) -> str:
        return f"Divergence({self.name!r})"


def _xlogx(r: torch.Tensor) -> torch.Tensor:
    return r * torch.log(r)


_REGISTRY: dict[str, Divergence] = {
    "reverse_kl": Divergence("reverse_kl", lambda r: -torch.log(r), lambda r: torch.ones_like(r), constant_h=True),
    "softened_reverse_kl": Divergence(
        "softened_reverse_kl",
        lambda r: (r + 1) * torch.log((r + 1) / (2 * r)),
        lambda r: 1 / (1 + r),
    ),
    "forward_kl": Divergence("forward_kl", _xlogx, lambda r: r.clone()),
    "js": Divergence(
        "js",
        lambda r: _xlogx(r) - (r + 1) * torch.log((r + 1) / 2),
        lambda r: r / (1 + r),
    ),
    "hellinger": Divergence("hellinger", lambda r: 1 - torch.sqrt(r), lambda r: 0.25 * torch.sqrt(r)),
    "jeffreys": Divergence("jeffreys", lambda r: (r - 1) * torch.log(r), lambda r: 1 + r),
    "pearson": Divergence("pearson", lambda r: (r - 1) ** 2, lambda r: 2 * r**2),
    "neyman": Divergence("neyman", lambda r: (1 - r) ** 2 / r, lambda r: 2 / r),
}

#: Short names used by the f-distill paper and NVIDIA FastGen.
ALIASES: dict[str, str] = {
    "rkl": "reverse_kl",
    "dmd": "reverse_kl",
    "sf": "softened_reverse_kl",
    "kl": "forward_kl",
    "fkl": "forward_kl",
    "sh": "hellinger",
    "jf": "jeffreys",
}


def register_divergence(divergence: Divergence, aliases: tuple[str, ...] = ()) -> None:
    """Register ``divergence`` under its name (and ``aliases``) for :func:`get` and f-distill configs.

    ``divergence.h`` must be ``r^2 f''(r)`` (``tests/test_divergences.py`` checks the built-ins by autograd).
    """
    if not isinstance(divergence, Divergence):
        raise ValueError(f"register_divergence needs a Divergence, got {type(divergence).__name__}")
    key = divergence.name.strip().lower()
    if not key or key.startswith("alpha:"):
        raise ValueError(f"divergence name must be non-empty and not 'alpha:...', got {divergence.name!r}")
    _REGISTRY[key] = divergence
    for a in aliases:
        ALIASES[a.strip().lower()] = key


def names() -> tuple[str, ...]:
    """Canonical names accepted by :func:`get` (plus :data:`ALIASES` and ``"alpha:<a>"``)."""
    return tuple(_REGISTRY)


#: The built-in canonical names.
NAMES: tuple[str, ...] = tuple(_REGISTRY)


def alpha(a: float) -> Divergence:
    """The alpha-divergence ``f = (r^a - a r - (1 - a)) / (a (a - 1))`` with ``h = r^a``.

    ``a -> 0`` is reverse-KL (``f = -log r + r - 1``), ``a = 1/2`` squared Hellinger (up to 4x),
    ``a -> 1`` forward-KL (``f = r log r - r + 1``), ``a = 2`` Pearson/2, ``a = -1`` Neyman/2.
    """
    a = float(a)
    if not math.isfinite(a):
        raise ValueError(f"alpha must be a finite float, got {a}")
    name = f"alpha:{a:g}"
    if a == 0.0:
        return Divergence(name, lambda r: -torch.log(r) + r - 1, lambda r: torch.ones_like(r), constant_h=True)
    if a == 1.0:
        return Divergence(name, lambda r: _xlogx(r) - r + 1, lambda r: r.clone())
    return Divergence(name, lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1)), lambda r: r**a)


def get(name: str) -> Divergence:
    """Look up a divergence by name.

    Accepts the names of :func:`names` (the built-ins :data:`NAMES` and registered ones), the short
    names in :data:`ALIASES` (``rkl, sf, kl, fkl, sh, jf``) and ``"alpha:<a>"`` (e.g. ``"alpha:0.5"``).
    Raises ``ValueError`` listing the accepted names.
    """
    if not isinstance(name, str):
        raise ValueError(f"divergence must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key.startswith("alpha:"):
        try:
            a = float(key.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"divergence {name!r}: expected 'alpha:<float>', e.g. 'alpha:0.5'") from None
        return alpha(a)
    raise ValueError(
        f"unknown divergence {name!r}; accepted: {', '.join(names())}, aliases {', '.join(ALIASES)}, "
        "or 'alpha:<a>'"
    )
