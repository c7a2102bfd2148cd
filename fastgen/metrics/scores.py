"""Scores over feature matrices: Inception Score, KID and k-NN precision/recall.

Inputs are features already extracted (``(N, d)`` tensors, or logits for IS); :mod:`fastgen.metrics.compute`
streams images into them. Distances run in float64, in chunks, so memory is O(chunk * N), not O(N^2).
"""

from __future__ import annotations

import numpy as np
import torch


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from logits, over ``splits`` contiguous splits.

    Args:
        logits: ``(N, K)``; for Inception the 1008-way ``logits_unbiased`` (no bias), as TF/torch-fidelity.
        splits: number of splits (10 by convention); N >= splits.

    Returns:
        ``(mean, std)`` over splits, std with the population convention (ddof=0, as TF and torch-fidelity;
        torchmetrics uses Bessel's correction).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (N, K) tensor, got {getattr(logits, 'shape', type(logits))}")
    n = logits.shape[0]
    if splits < 1 or n < max(2, splits):
        raise ValueError(f"inception_score needs N >= max(2, splits); got N={n}, splits={splits}")
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        part_p, part_logp = p[lo:hi], logp[lo:hi]
        log_py = torch.log(part_p.mean(dim=0, keepdim=True))
        kl = (part_p * (part_logp - log_py)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def kid(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with ``k(x, y) = (x.y / d + 1)^3``, over random subsets.

    Uses torchmetrics' ``poly_mmd`` in float64; subsets are drawn without replacement with a seeded
    generator. Returns ``(mean, std)`` over subsets (population std).

    Raises:
        ValueError: feature sizes differ or either set has fewer than ``subset_size`` rows.
    """
    from torchmetrics.image.kid import poly_mmd

    _check_pair(real_features, fake_features)
    n_r, n_f = real_features.shape[0], fake_features.shape[0]
    if subset_size < 2 or min(n_r, n_f) < subset_size:
        raise ValueError(
            f"kid needs subset_size >= 2 and both sets at least subset_size={subset_size} samples; "
            f"got {n_r} real and {n_f} generated (lower subset_size, conventionally 1000; CLI: --kid-subset-size)"
        )
    gen = torch.Generator().manual_seed(seed)
    fr, ff = real_features.double().cpu(), fake_features.double().cpu()
    vals = []
    for _ in range(subsets):
        a = fr[torch.randperm(n_r, generator=gen)[:subset_size]]
        b = ff[torch.randperm(n_f, generator=gen)[:subset_size]]
        vals.append(float(poly_mmd(a, b)))
    return float(np.mean(vals)), float(np.std(vals))


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("real_features", a), ("fake_features", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a (N, d) tensor, got {getattr(t, 'shape', type(t))}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"mismatched feature sizes: real d={a.shape[1]}, fake d={b.shape[1]}")


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i : i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 0 distance to itself is the first
    return torch.cat(radii)


def _coverage(query: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = 0
    for i in range(0, query.shape[0], chunk):
        d = torch.cdist(query[i : i + chunk], centers)
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / query.shape[0]


def precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls (k = 3 by default).

    Precision: fraction of generated samples inside at least one real sample's k-NN ball; recall:
    fraction of real samples inside at least one generated sample's ball. Both in [0, 1].
    """
    _check_pair(real_features, fake_features)
    if k < 1 or min(real_features.shape[0], fake_features.shape[0]) <= k:
        raise ValueError(f"precision_recall needs k >= 1 and more than k samples per set; got k={k}")
    r, f = real_features.double(), fake_features.double()
    rr, rf = _knn_radii(r, k, chunk), _knn_radii(f, k, chunk)
    return _coverage(f, r, rr, chunk), _coverage(r, f, rf, chunk)
