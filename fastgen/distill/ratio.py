"""Density ratio ``r = p_teacher / q_student`` from discriminator logits, and its normalisation chain.

The chain (f-distill card, section 4; all detached, float32). Every statistic a sample is normalised
with comes from its own micro-batch (shard) and the ratio-bin buffer as it was at the start of the
optimizer step, and the buffer's update sums the shards' statistics (across processes with accelerate's
``reduce``) once per step, so a run does not depend on how many processes share the shards:

1. :func:`logit_to_ratio` -- mean over heads -> clamp ``[-10, 10]`` -> exp -> clip ``[0.1, 20]`` -> detach.
2. :class:`RatioBins` -- per-time-bin normalisation ``r~ = r / (b_k + 1e-6)`` with bins equal-width
   in **log sigma** (not raw sigma, which puts most samples into the first bin) and an EMA
   ``b_k <- rho b_k + (1 - rho) mean(r | bin k)`` updated only for bins that received samples. The bin
   buffer is a persistent buffer, so it lands in the checkpoint. :meth:`RatioBins.shard_normalise`
   normalises one shard with ``rho b_k + (1 - rho) mean(r | bin k, shard)`` and defers the buffer
   update to :meth:`RatioBins.commit` (sums and counts of every shard of the step); with one shard this
   is exactly :meth:`RatioBins.update` followed by :meth:`RatioBins.normalise`.
3. :func:`normalise_h` -- ``h~ = h / mean(h)`` over the micro-batch (mean clamped below at 1e-6),
   so ``mean(h~) = 1``; a constant ``h`` (reverse-KL) gives exactly ones.
4. the DMD per-sample weight ``1 / (mean over features of |x_i - D_teacher,i| + eps)`` is applied in
   :func:`fastgen.distill.fdistill.dmd_gradient`.

:func:`discriminator_loss` is the logistic loss whose optimum logit is ``log(p/q)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes (accelerate's ``reduce``) when ``torch.distributed`` is initialised."""
    if _dist_ready():
        from accelerate.utils import reduce

        return reduce(t.clone(), reduction="sum")
    return t


def logit_to_ratio(
    logits: torch.Tensor, logit_clamp: float = 10.0, ratio_clip: tuple[float, float] = (0.1, 20.0)
) -> torch.Tensor:
    """Detached ratio ``r`` (B,) float32 from logits ``(B,)`` or ``(B, heads)`` (mean over heads).

    ``r = clip(exp(clamp(mean_heads(logit), -c, c)), lo, hi)``.
    """
    if logits.ndim == 2:
        logits = logits.mean(dim=1)
    if logits.ndim != 1:
        raise ValueError(f"logits must have shape (B,) or (B, heads), got {tuple(logits.shape)}")
    lo, hi = ratio_clip
    return logits.detach().float().clamp(-logit_clamp, logit_clamp).exp().clamp(lo, hi)


def discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Logistic loss ``mean softplus(-l(real)) + mean softplus(l(fake))``; optimum ``l = log(p/q)``."""
    return F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()


#: Bin spaces of :class:`RatioBins`: equal width in ``log sigma`` (fastgen) or in raw ``sigma`` (FastGen).
BIN_SPACES = ("log", "linear")


class RatioBins(nn.Module):
    """Per-time-bin ratio normaliser over ``num_bins`` equal-width bins in ``log sigma`` (``space="log"``)
    or in raw ``sigma`` (``space="linear"``: NVIDIA FastGen's bins, where most Karras-grid draws fall in
    the first bin).

    Args:
        sigma_min, sigma_max: the range of diffusion sigmas the method samples (bins span it).
        num_bins: number of bins (10 in FastGen).
        rho: EMA factor of the bin means (0 = use the current batch's bin mean; 0.5 on ImageNet-64).
        eps: added to the bin mean in the division.
        space: ``"log"`` or ``"linear"`` (see :data:`BIN_SPACES`).

    The buffer ``means`` (num_bins,) starts at 1 and is saved in ``state_dict()``.
    """

    def __init__(
        self,
        sigma_min: float,
        sigma_max: float,
        num_bins: int = 10,
        rho: float = 0.0,
        eps: float = 1e-6,
        space: str = "log",
    ) -> None:
        super().__init__()
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"ratio bins need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if num_bins < 1:
            raise ValueError(f"ratio_bins must be >= 1, got {num_bins}")
        if not (0.0 <= rho < 1.0):
            raise ValueError(f"ratio_rho must be in [0, 1), got {rho}")
        if space not in BIN_SPACES:
            raise ValueError(f"ratio_bin_space must be one of {BIN_SPACES}, got {space!r}")
        self.space = space
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.log_min = math.log(sigma_min)
        self.log_max = math.log(sigma_max)
        self.num_bins = int(num_bins)
        self.rho = float(rho)
        self.eps = float(eps)
        self.register_buffer("means", torch.ones(num_bins, dtype=torch.float32))

    def bin_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Bin index (long, same shape) of each sigma; out-of-range sigmas go to the end bins."""
        if self.space == "linear":
            u = (sigma.detach().double() - self.sigma_min) / (self.sigma_max - self.sigma_min)
        else:
            u = (sigma.detach().double().log() - self.log_min) / (self.log_max - self.log_min)
        return (u * self.num_bins).floor().long().clamp(0, self.num_bins - 1)

    def _stats(self, r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        idx = self.bin_index(sigma).to(self.means.device)
        r = r.detach().float().to(self.means.device)
        sums = torch.zeros(self.num_bins, device=self.means.device).index_add_(0, idx, r)
        counts = torch.zeros(self.num_bins, device=self.means.device).index_add_(0, idx, torch.ones_like(r))
        return torch.stack([sums, counts])

    def _ema(self, means: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        sums, counts = stats[0], stats[1]
        hit = counts > 0
        out = means.clone()
        out[hit] = self.rho * means[hit] + (1 - self.rho) * (sums[hit] / counts[hit])
        return out

    @torch.no_grad()
    def update(self, r: torch.Tensor, sigma: torch.Tensor) -> None:
        """EMA-update the bins that received samples (sums and counts summed across processes)."""
        self.means.copy_(self._ema(self.means, all_reduce_sum(self._stats(r, sigma))))

    @torch.no_grad()
    def shard_normalise(self, r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Normalise one shard's ``r`` with the step-start bins EMA'd with this shard's bin means;
        the shard's sums and counts wait in ``self.pending`` for :meth:`commit`. Returns ``r~`` (detached)."""
        stats = self._stats(r, sigma)
        pending = getattr(self, "pending", None)
        self.pending = stats if pending is None else pending + stats
        idx = self.bin_index(sigma).to(self.means.device)
        cur = self._ema(self.means, stats)
        return (r.detach().float() / (cur[idx].to(r.device) + self.eps)).detach()

    @torch.no_grad()
    def commit(self) -> None:
        """Apply the step's pending shard statistics (summed over processes) to the buffer; every
        process must call it once per optimizer step (a collective when distributed)."""
        pending = getattr(self, "pending", None)
        stats = pending if pending is not None else torch.zeros(2, self.num_bins, device=self.means.device)
        self.pending = None
        self.means.copy_(self._ema(self.means, all_reduce_sum(stats)))

    def normalise(self, r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``r / (b_k + eps)`` for each sample's bin ``k`` (detached)."""
        idx = self.bin_index(sigma).to(self.means.device)
        return (r.detach().float() / (self.means[idx].to(r.device) + self.eps)).detach()


def normalise_h(h: torch.Tensor, min_mean: float = 1e-6) -> torch.Tensor:
    """``h / mean(h)`` (detached, float32) with the mean over ``h`` (one micro-batch; no process sees
    another's shard, so the process count does not change it).

    The mean is clamped below at ``min_mean``; a constant ``h`` gives exactly ones.
    """
    h = h.detach().float()
    mean = (h.sum() / float(h.numel())).clamp_min(min_mean)
    return h / mean
