"""Exact analytic denoisers (no model error): a Gaussian mixture in closed form and the empirical "ideal denoiser".

Both follow the EDM contract of :mod:`fastgen.core.denoiser`: ``D(x, sigma) -> x0_hat`` with ``x = x0 + sigma * eps``.
They measure sampler error exactly, so schedules and solvers are judged on them without a network in the way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import _check_device, sigma_batch


class GaussianMixtureDenoiser(nn.Module):
    """Exact denoiser of ``p(x0) = sum_k w_k N(mu_k, Sigma_k)`` (no model error).

    Give ``stds`` (K,) for isotropic components ``Sigma_k = s_k^2 I`` or ``covs`` (K, d, d) for
    general ones. Inputs ``x`` of shape ``(B, ...)`` are flattened to ``(B, d)``. Computed in
    float64 and returned in x's dtype. ``cond`` may hold ``class_labels`` (B,) to condition on one
    component per sample (class-conditional toys: one class per mode).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        means: torch.Tensor,
        stds: torch.Tensor | None = None,
        covs: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {tuple(weights.shape)}")
        if (stds is None) == (covs is None):
            raise ValueError("give exactly one of stds (K,) or covs (K, d, d)")
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("means", means)
        if stds is not None:
            stds = torch.as_tensor(stds, dtype=torch.float64)
            if stds.shape != (k,):
                raise ValueError(f"stds must have shape ({k},), got {tuple(stds.shape)}")
            self.register_buffer("stds", stds)
            self.covs = None
        else:
            covs = torch.as_tensor(covs, dtype=torch.float64)
            if covs.shape != (k, d, d):
                raise ValueError(f"covs must have shape ({k}, {d}, {d}), got {tuple(covs.shape)}")
            self.register_buffer("covs", covs)
            self.stds = None
        self.sigma_min = None
        self.sigma_max = None

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _posterior(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log posterior weights (B, K) and per-component means (B, K, d); float64."""
        s2 = sigma.double()[:, None] ** 2  # (B, 1)
        d = self.dim
        diff = x[:, None, :] - self.means[None]  # (B, K, d)
        if self.stds is not None:
            var = self.stds[None] ** 2 + s2  # (B, K)
            logits = (
                self.weights.log()[None]
                - 0.5 * d * var.log()
                - 0.5 * (diff**2).sum(-1) / var
            )
            m = self.means[None] + (self.stds[None] ** 2 / var)[..., None] * diff
            return logits, m
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        cov = self.covs[None] + s2[..., None, None] * eye  # (B, K, d, d)
        chol = torch.linalg.cholesky(cov)
        sol = torch.cholesky_solve(diff[..., None], chol)[..., 0]  # cov^-1 diff
        logdet = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
        logits = self.weights.log()[None] - 0.5 * logdet - 0.5 * (diff * sol).sum(-1)
        m = self.means[None] + torch.einsum("kij,bkj->bki", self.covs, sol)
        return logits, m

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None, **_: Any
    ) -> torch.Tensor:
        _check_device(x, self.means, "mixture")
        s = sigma_batch(sigma, x).double()
        flat = x.reshape(x.shape[0], -1).double()
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} features per sample, the mixture has d={self.dim}")
        logits, m = self._posterior(flat, s)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels)
            k = self.means.shape[0]
            if class_labels.shape != (x.shape[0],) or class_labels.is_floating_point():
                raise ValueError(
                    f"class_labels must be an integer tensor of shape ({x.shape[0]},), "
                    f"got {class_labels.dtype} of shape {tuple(class_labels.shape)}"
                )
            if len(class_labels) and (int(class_labels.min()) < 0 or int(class_labels.max()) >= k):
                raise ValueError(f"class_labels must be in [0, {k - 1}], got {class_labels.tolist()}")
            mask = torch.full_like(logits, -math.inf)
            mask.scatter_(1, class_labels.long().reshape(-1, 1).to(x.device), 0.0)
            logits = logits + mask
        w = torch.softmax(logits, dim=1)
        out = (w[..., None] * m).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``log p_sigma(x)`` (B,) of the noised mixture; differentiable in x (float64)."""
        _check_device(x, self.means, "mixture")
        s = sigma_batch(sigma, x).double()
        flat = x.reshape(x.shape[0], -1).double()
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} features per sample, the mixture has d={self.dim}")
        logits, _ = self._posterior(flat, s)
        return torch.logsumexp(logits, dim=1) - 0.5 * self.dim * math.log(2 * math.pi)


class EmpiricalDenoiser(nn.Module):
    """Exact denoiser of the empirical distribution of ``data`` (N, ...), the "ideal denoiser".

    With ``bandwidth`` s > 0 each point becomes ``N(y_n, s^2 I)``:
    ``D = m + s^2/(s^2+sigma^2) (x - m)``, ``m = sum_n softmax(-|x-y_n|^2 / (2(s^2+sigma^2))) y_n``.
    With s = 0 it snaps to the nearest point as sigma -> 0 (it memorises; never use it to judge
    generalisation). Memory is O(B N) per call; ``chunk`` bounds the batch processed at once.
    """

    def __init__(self, data: torch.Tensor, bandwidth: float = 0.0, chunk: int = 1024) -> None:
        super().__init__()
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape (N, ...) with N >= 1, got {tuple(data.shape)}")
        if bandwidth < 0:
            raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
        flat = data.reshape(data.shape[0], -1).double()
        self.register_buffer("data", flat)
        self.register_buffer("sq_norms", (flat**2).sum(1))
        self.bandwidth = float(bandwidth)
        self.chunk = int(chunk)
        self.sigma_min = None
        self.sigma_max = None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **_: Any) -> torch.Tensor:
        _check_device(x, self.data, "empirical denoiser")
        s = sigma_batch(sigma, x).double()
        flat = x.reshape(x.shape[0], -1).double()
        if flat.shape[1] != self.data.shape[1]:
            raise ValueError(f"x has {flat.shape[1]} features per sample, the data has {self.data.shape[1]}")
        var = s**2 + self.bandwidth**2  # (B,)
        outs = []
        for i in range(0, flat.shape[0], self.chunk):
            xb, vb = flat[i : i + self.chunk], var[i : i + self.chunk]
            d2 = (xb**2).sum(1, keepdim=True) - 2 * xb @ self.data.T + self.sq_norms[None]
            w = torch.softmax(-d2 / (2 * vb[:, None]), dim=1)
            m = w @ self.data
            if self.bandwidth > 0:
                m = m + (self.bandwidth**2 / vb)[:, None] * (xb - m)
            outs.append(m)
        return torch.cat(outs).reshape(x.shape).to(x.dtype)
