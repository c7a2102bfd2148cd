"""Gaussian feature statistics and the Frechet distance between them.

:class:`FeatureStatistics` accumulates float64 running sums ``sum x``, ``sum x x^T`` and a count,
so feature batches can be streamed from a sampler and statistics from several processes (or
several shards) merged exactly: it is a ``torchmetrics.Metric`` whose states reduce by summation,
the same states ``torchmetrics.image.FrechetInceptionDistance`` keeps per side.

:func:`frechet_distance` computes

    FD = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2)

in float64 with the eigenvalue trick (``tr sqrt(S1 S2) = sum_i sqrt(lambda_i(S1 S2))``, the
eigenvalues taken as complex numbers, real parts summed), exactly what torchmetrics does.
scipy's ``sqrtm`` is never called here (and never with the ``disp`` argument removed in scipy 1.18).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    elif isinstance(x, torch.Tensor):
        t = x.detach().to(device="cpu", dtype=torch.float64)
    else:
        raise ValueError(f"{name} must be a numpy array or a torch.Tensor, got {type(x).__name__}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


#: Relative tolerance of the PSD check. A covariance computed in float64 from float32 features is PSD up to
#: round-off of order d * eps64 * ||S|| (~1e-12 for d = 2048); a wrong matrix (asymmetric, a negative
#: variance, a corrupt file) has eigenvalues of order -||S||. 1e-6 separates the two by six decades each way.
PSD_RTOL = 1e-6


def _check_psd(s: torch.Tensor, name: str) -> None:
    """Refuse a covariance that is not symmetric positive semi-definite (up to :data:`PSD_RTOL`)."""
    scale = float(s.abs().max()) if s.numel() else 0.0
    if scale == 0.0:
        return
    if float((s - s.t()).abs().max()) > PSD_RTOL * scale:
        raise ValueError(f"{name} is not symmetric; a covariance must be symmetric positive semi-definite")
    eye = torch.eye(s.shape[0], dtype=s.dtype)
    _, info = torch.linalg.cholesky_ex(s + PSD_RTOL * scale * eye)
    if int(info) != 0:
        lo = float(torch.linalg.eigvalsh(s)[0])
        raise ValueError(
            f"{name} is not positive semi-definite (smallest eigenvalue {lo:.4g}, largest |entry| {scale:.4g}); "
            "it is not a covariance (corrupt or hand-made statistics?)"
        )


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    Args:
        mu1, mu2: means, shape ``(d,)`` (numpy arrays or tensors, any float dtype/device).
        sigma1, sigma2: covariances, shape ``(d, d)``, symmetric positive semi-definite.

    Returns:
        The distance as a Python float (>= 0 up to round-off; identical sets give ~1e-12 or a
        tiny negative number, as in every implementation).

    Raises:
        ValueError: if shapes disagree (names the arguments and the shapes), values are not finite, or a
            sigma is not symmetric positive semi-definite (names it; the API and the CLI both refuse).
    """
    m1, s1 = _as_float64(mu1, "mu1"), _as_float64(sigma1, "sigma1")
    m2, s2 = _as_float64(mu2, "mu2"), _as_float64(sigma2, "sigma2")
    if m1.dim() != 1 or m2.dim() != 1:
        raise ValueError(f"mu1 and mu2 must be 1-D (d,), got shapes {tuple(m1.shape)} and {tuple(m2.shape)}")
    d = m1.shape[0]
    if m2.shape[0] != d:
        raise ValueError(f"feature sizes differ: mu1 has d={d}, mu2 has d={m2.shape[0]}")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if tuple(s.shape) != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match the means, got {tuple(s.shape)}")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        _check_psd(s, name)
    diff = m1 - m2
    tr_covmean = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    fd = diff.dot(diff) + s1.trace() + s2.trace() - 2.0 * tr_covmean
    return float(fd)


class FeatureStatistics(Metric):
    """Streaming float64 mean and covariance of ``(N, d)`` feature batches.

    ``update(features)`` adds a batch; ``mu`` / ``sigma`` give the mean ``(d,)`` and the unbiased
    covariance ``(d, d)`` (divisor ``N - 1``) as float64 tensors. Statistics merge exactly:
    ``a.merge(b)`` (or torchmetrics' distributed sync, whose reduction is a sum) equals the
    statistics of the concatenated features. Memory is O(d^2), constant in N.

    Args:
        num_features: ``d``; if None it is fixed by the first batch.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_features: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._d = None if num_features is None else int(num_features)
        d = self._d or 0
        self.add_state("features_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("features_cov_sum", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def num_features(self) -> int | None:
        """Feature size ``d`` (None until the first batch when not given)."""
        return self._d

    def _ensure(self, d: int) -> None:
        if self._d is None:
            self._d = d
            dev = self.features_sum.device
            self.features_sum = torch.zeros(d, dtype=torch.float64, device=dev)
            self.features_cov_sum = torch.zeros(d, d, dtype=torch.float64, device=dev)
            self._defaults["features_sum"] = torch.zeros(d, dtype=torch.float64)
            self._defaults["features_cov_sum"] = torch.zeros(d, d, dtype=torch.float64)
        elif d != self._d:
            raise ValueError(f"features have d={d} but these statistics hold d={self._d} (mismatched feature sizes)")

    def update(self, features: torch.Tensor) -> None:  # type: ignore[override]
        """Add a batch of features, shape ``(B, d)`` (any float dtype; accumulated in float64)."""
        if not isinstance(features, torch.Tensor):
            raise ValueError(f"features must be a torch.Tensor (B, d), got {type(features).__name__}")
        if features.dim() != 2:
            raise ValueError(f"features must have shape (B, d), got {tuple(features.shape)}")
        self._ensure(int(features.shape[1]))
        f = features.detach().to(device=self.features_sum.device, dtype=torch.float64)
        s = f.sum(dim=0)
        if not torch.isfinite(s).all():  # a NaN/Inf anywhere shows in the float64 column sums
            raise ValueError("features contain NaN or Inf")
        self.features_sum += s
        self.features_cov_sum += f.t().mm(f)
        self.num_samples += f.shape[0]

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Add the sums of ``other`` into these statistics (in place) and return ``self``."""
        if not isinstance(other, FeatureStatistics):
            raise ValueError(f"other must be FeatureStatistics, got {type(other).__name__}")
        if other.num_features is None:
            return self
        self._ensure(other.num_features)
        self.features_sum += other.features_sum.to(self.features_sum.device)
        self.features_cov_sum += other.features_cov_sum.to(self.features_sum.device)
        self.num_samples += other.num_samples.to(self.num_samples.device)
        return self

    @property
    def count(self) -> int:
        """Number of feature vectors accumulated."""
        return int(self.num_samples)

    def _check_count(self) -> int:
        n = int(self.num_samples)
        if n < 2:
            raise ValueError(f"at least 2 samples are needed for a covariance, got {n}")
        return n

    @property
    def mu(self) -> torch.Tensor:
        """Mean ``(d,)`` float64."""
        n = self._check_count()
        return self.features_sum / n

    @property
    def sigma(self) -> torch.Tensor:
        """Unbiased covariance ``(d, d)`` float64: ``(sum x x^T - N mu mu^T) / (N - 1)``."""
        n = self._check_count()
        mu = self.features_sum / n
        cov = (self.features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
        return 0.5 * (cov + cov.t())

    def global_stats(self, **sync_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(mu, sigma, count)`` over all processes (a collective call: every rank must make it).

        Outside ``torch.distributed`` this is just the local statistics. ``sync_kwargs`` go to
        torchmetrics' ``sync_context`` (``dist_sync_fn``, ``process_group``, ``distributed_available``).
        """
        with self.sync_context(**sync_kwargs):
            return self.mu.clone(), self.sigma.clone(), int(self.num_samples)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` as float64 tensors."""
        return self.mu, self.sigma
