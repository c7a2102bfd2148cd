"""Distillation metrics that separate a student's own error from its teacher's.

FD against held-out data mixes two errors: the teacher's (it memorises, it misses part of the data)
and the student's (it misses part of the teacher). The functions here measure them apart:

- :func:`knn_precision_recall`: k-NN precision and recall (Kynkaanniemi et al. 2019) in any feature
  space (raw pixels by default, or ``features="digits"``): against data, or against the teacher's
  own samples. Precision = fraction of generated samples inside some reference sample's k-NN ball;
  recall = fraction of reference samples inside some generated sample's ball. The radius of a ball
  is the distance to the k-th nearest neighbour *within its own set*, excluding the point itself.
- :func:`fd_to_teacher`: FD of the student's samples to the teacher's samples, reported beside its
  floor (teacher vs teacher drawn with other noise), since FD has a finite-sample bias.
- :func:`class_diversity`: mean within-class per-pixel standard deviation (classes from the digits
  classifier or given labels); a student that keeps the class but collapses inside it scores lower.
- :func:`mean_ci`: aggregate per-seed values into a mean and a two-sided t-interval (95% by default).

All distance computations are chunked through :func:`torch.cdist` (memory ``O(chunk x N)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastgen.metrics.scores import precision_recall
from fastgen.metrics.stats import FeatureStatistics, frechet_distance

__all__ = ["coverage_features", "knn_precision_recall", "fd_between", "fd_to_teacher", "class_diversity", "mean_ci"]


def coverage_features(x: torch.Tensor, features: str = "pixels") -> torch.Tensor:
    """``(N, d)`` float64 features of samples ``x`` of shape ``(N, ...)``.

    ``features``: ``"pixels"`` (flattened values, any shape; ``(N, d)`` input is taken as features)
    or ``"digits"`` (64-d features of the shipped digits classifier; ``x`` must be ``(N, 1, 8, 8)``
    in [-1, 1]).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"samples must be a tensor of shape (N, ...) with N >= 1, got {getattr(x, 'shape', type(x))}")
    if features == "pixels":
        return x.detach().reshape(x.shape[0], -1).double()
    if features == "digits":
        from fastgen.metrics.digits import digits_features

        return digits_features(x.detach().float()).double()
    raise ValueError(f"features must be 'pixels' or 'digits', got {features!r}")


def knn_precision_recall(
    generated: torch.Tensor,
    reference: torch.Tensor,
    k: int = 3,
    features: str = "pixels",
    chunk: int = 1024,
) -> dict[str, float]:
    """k-NN precision and recall of ``generated`` against ``reference`` (data or teacher samples).

    Args:
        generated, reference: ``(N, ...)`` samples (see :func:`coverage_features`); each set needs
            more than ``k`` samples.
        k: neighbour rank defining each ball's radius (the point itself excluded), k >= 1.
        features: ``"pixels"`` or ``"digits"``.
        chunk: rows per :func:`torch.cdist` block.

    Returns:
        ``{"precision": p, "recall": r}``, both in [0, 1]. A point on a ball's boundary counts as inside.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    g, r = coverage_features(generated, features), coverage_features(reference, features)
    p, rec = precision_recall(r, g, k=k, chunk=chunk)
    return {"precision": p, "recall": rec}


def fd_between(a: torch.Tensor, b: torch.Tensor, features: str = "digits") -> float:
    """Frechet distance between two sample sets in ``features`` space (float64 statistics)."""
    fa, fb = coverage_features(a, features), coverage_features(b, features)
    if fa.shape[0] < 2 or fb.shape[0] < 2 or fa.shape[1] != fb.shape[1]:
        raise ValueError(
            f"need >= 2 samples per set with equal feature sizes, got {tuple(fa.shape)}, {tuple(fb.shape)}"
        )
    sa, sb = FeatureStatistics(fa.shape[1]), FeatureStatistics(fb.shape[1])
    sa.update(fa)
    sb.update(fb)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


def fd_to_teacher(
    student: torch.Tensor, teacher: torch.Tensor, teacher_other: torch.Tensor, features: str = "digits"
) -> dict[str, float]:
    """FD of the student's samples to the teacher's, and its floor.

    Args:
        student: student samples; teacher: teacher samples; teacher_other: teacher samples drawn
            with independent noise (same size as ``student`` for a like-for-like floor). Draw the
            student's noise independently of ``teacher``'s too: a student trained to match the teacher
            sample by sample (DMD's regression loss) sits on the teacher's samples from the same noise,
            and the comparison with the floor would then hold by construction.

    Returns:
        ``{"fd_to_teacher": FD(student, teacher), "floor": FD(teacher_other, teacher),
        "excess": difference}``. ``excess`` near 0 means the student is as close to the teacher as the
        teacher is to itself at this sample size.
    """
    fd = fd_between(student, teacher, features)
    floor = fd_between(teacher_other, teacher, features)
    return {"fd_to_teacher": fd, "floor": floor, "excess": fd - floor}


def class_diversity(
    samples: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None, min_count: int = 2
) -> dict[str, Any]:
    """Mean within-class per-pixel standard deviation.

    Args:
        samples: ``(N, ...)`` images.
        labels: ``(N,)`` integer classes; ``None`` classifies with the digits classifier
            (``samples`` must then be ``(N, 1, 8, 8)`` in [-1, 1]).
        min_count: classes with fewer samples are skipped (a std needs >= 2).

    Returns:
        ``{"diversity": mean over classes of (mean over pixels of the unbiased std within the class),
        "per_class": {class: value}, "counts": {class: n}}``.
    """
    if not isinstance(samples, torch.Tensor) or samples.dim() < 2:
        raise ValueError(f"samples must be a tensor of shape (N, ...), got {getattr(samples, 'shape', type(samples))}")
    if labels is None:
        from fastgen.metrics.digits import digits_logits

        labels = digits_logits(samples.detach().float()).argmax(1)
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.shape[0] != samples.shape[0] or labels.dtype.is_floating_point:
        raise ValueError(
            f"labels must be {samples.shape[0]} integers, got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    x = samples.detach().reshape(samples.shape[0], -1).double()
    per_class, counts = {}, {}
    for c in torch.unique(labels).tolist():
        xc = x[labels == c]
        counts[int(c)] = int(xc.shape[0])
        if xc.shape[0] >= max(min_count, 2):
            per_class[int(c)] = float(xc.std(dim=0, unbiased=True).mean())
    if not per_class:
        raise ValueError(f"no class has >= {max(min_count, 2)} samples")
    return {"diversity": sum(per_class.values()) / len(per_class), "per_class": per_class, "counts": counts}


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-seed ``values`` and the two-sided Student-t interval ``(mean, low, high)``.

    ``low == high == mean`` for a single value (no spread to estimate).
    """
    import numpy as np
    from scipy import stats

    v = np.asarray(list(values), dtype=np.float64)
    if v.ndim != 1 or v.size < 1 or not np.isfinite(v).all():
        raise ValueError(f"values must be a non-empty sequence of finite numbers, got {values!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    m = float(v.mean())
    if v.size == 1:
        return m, m, m
    half = float(stats.t.ppf(0.5 + confidence / 2, df=v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - half, m + half
