"""Low-dimensional Gaussian mixtures: the exact test bed (closed-form denoisers, no model error).

A mixture is ``p(x0) = sum_k w_k N(mu_k, s_k^2 I)`` (isotropic components) with
``weights`` (K,), ``means`` (K, d) and ``stds`` (K,). ``denoiser()`` returns the exact
:class:`fastgen.core.analytic.GaussianMixtureDenoiser` of the mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen.core.analytic import GaussianMixtureDenoiser


@dataclass(frozen=True)
class GaussianMixture:
    """An isotropic Gaussian mixture in d dimensions (float64 parameters)."""

    weights: torch.Tensor  # (K,), sums to 1
    means: torch.Tensor  # (K, d)
    stds: torch.Tensor  # (K,)

    def __post_init__(self) -> None:
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(self.means.shape)}")
        k = self.means.shape[0]
        if self.weights.shape != (k,) or self.stds.shape != (k,):
            raise ValueError(
                f"weights and stds must have shape ({k},), got {tuple(self.weights.shape)} and "
                f"{tuple(self.stds.shape)}"
            )
        if (self.weights < 0).any() or abs(float(self.weights.sum()) - 1.0) > 1e-6:
            raise ValueError("weights must be non-negative and sum to 1")
        if (self.stds <= 0).any():
            raise ValueError("stds must be positive")

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_modes(self) -> int:
        return int(self.means.shape[0])

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples; returns ``(x (n, d), component labels (n,))``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        labels = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means.double()[labels] + self.stds.double()[labels, None] * noise
        return x.to(dtype), labels

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density log p_0(x) for x of shape (n, d)."""
        x = x.double()
        s2 = self.stds.double() ** 2
        d2 = torch.cdist(x, self.means.double()) ** 2
        logp = (
            torch.log(self.weights.double())
            - 0.5 * self.dim * torch.log(2 * math.pi * s2)
            - d2 / (2 * s2)
        )
        return torch.logsumexp(logp, dim=1)

    def denoiser(self) -> GaussianMixtureDenoiser:
        """The exact denoiser ``D(x, sigma)`` of this mixture."""
        return GaussianMixtureDenoiser(self.weights, self.means, self.stds)

    def conditional(self, component: int) -> GaussianMixture:
        """The single component ``component`` as a one-mode mixture (class-conditional toys)."""
        return GaussianMixture(
            torch.ones(1, dtype=torch.float64),
            self.means[component : component + 1],
            self.stds[component : component + 1],
        )


def ring_mixture(
    num_modes: int = 8, radius: float = 3.0, std: float = 0.15, weights: str | torch.Tensor = "uniform"
) -> GaussianMixture:
    """The standard 2-D toy: ``num_modes`` modes on a circle.

    ``weights`` is ``"uniform"``, ``"imbalanced"`` (geometric from 0.4 down to 0.02 for 8 modes,
    normalised) or an explicit (K,) tensor.
    """
    if num_modes < 1:
        raise ValueError(f"num_modes must be >= 1, got {num_modes}")
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    w = _weights(weights, num_modes)
    return GaussianMixture(w, means, torch.full((num_modes,), float(std), dtype=torch.float64))


def grid_mixture(side: int = 5, spacing: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """A ``side x side`` grid of equal modes centred at the origin (2-D)."""
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    coords = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    gx, gy = torch.meshgrid(coords, coords, indexing="ij")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    k = side * side
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    return GaussianMixture(weights, means, torch.full((k,), float(std), dtype=torch.float64))


def random_mixture(
    dim: int,
    num_modes: int,
    seed: int = 0,
    mean_scale: float = 2.0,
    std_range: tuple[float, float] = (0.2, 0.6),
) -> GaussianMixture:
    """A d-dimensional mixture with random means, stds and Dirichlet(1) weights (seeded)."""
    if dim < 1 or num_modes < 1:
        raise ValueError(f"dim and num_modes must be >= 1, got dim={dim}, num_modes={num_modes}")
    g = torch.Generator().manual_seed(seed)
    means = mean_scale * torch.randn(num_modes, dim, generator=g, dtype=torch.float64)
    lo, hi = std_range
    stds = lo + (hi - lo) * torch.rand(num_modes, generator=g, dtype=torch.float64)
    w = -torch.log(torch.rand(num_modes, generator=g, dtype=torch.float64))
    return GaussianMixture(w / w.sum(), means, stds)


def _weights(weights: str | torch.Tensor, k: int) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        w = weights.double()
        return w / w.sum()
    if weights == "uniform":
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if weights == "imbalanced":
        if k == 1:
            return torch.ones(1, dtype=torch.float64)
        w = torch.logspace(math.log10(0.4), math.log10(0.02), k, dtype=torch.float64)
        return w / w.sum()
    raise ValueError(f"weights must be 'uniform', 'imbalanced' or a tensor, got {weights!r}")
