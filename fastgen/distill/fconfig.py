"""The options of f-distill (:class:`FDistillConfig`) and the names they accept."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fastgen.core.solvers import SOLVERS
from fastgen.distill import divergences
from fastgen.distill.ratio import BIN_SPACES
from fastgen.train.config import check_fields

__all__ = ["FDistillConfig", "PLACEMENTS", "FAKE_WEIGHTINGS"]

PLACEMENTS = ("teacher", "fake_score", "input")
FAKE_WEIGHTINGS = ("none", "edm")


@dataclass(frozen=True)
class FDistillConfig:
    """Settings of :class:`FDistill` (all validated at construction; the object is immutable).

    Attributes:
        sample_shape: per-sample shape of the data, e.g. ``(1, 8, 8)`` or ``(2,)`` (required).
        divergence: a name for :func:`fastgen.distill.divergences.get` (``js``, ``forward_kl``, ...).
        sigma_min, sigma_max: the diffusion sigma range of the distillation (VE units).
        student_sigma: sigma at which a denoiser-shaped student is evaluated (default ``sigma_max``).
        t_grid, t_index_lo, t_index_hi: sigmas are uniform over indices ``lo..hi`` of a Karras grid.
        lambda_gan: weight of the generator's GAN term (f-distill needs the discriminator trained).
        disc_weight: weight of the discriminator's logistic loss in the critic loss.
        r1_weight, r1_noise: approximate R1 penalty ``||l(x) - l(x + r1_noise n)||^2`` on real inputs.
        student_every: student update every k-th step (k = 5 in DMD2/FastGen).
        critic_on_student_steps: also update the critics on student steps (DMD2) or not (FastGen).
        fake_score_weighting: ``"none"`` (x0-MSE, FastGen) or ``"edm"`` (1/sigma^2 + 1/sigma_data^2).
        sigma_data: data std for the EDM weighting and the (x_t, log sigma) head's input scaling.
        ratio_bins, ratio_rho: per-time-bin ratio normalisation (number of bins, EMA factor rho).
        ratio_bin_space: ``"log"`` (equal-width bins in log sigma) or ``"linear"`` (in raw sigma, FastGen).
        logit_clamp, ratio_clip: clamps of the logit and of r.
        dmd_eps: added to DMD's per-sample normaliser ``mean |x - D_T|`` (0 = DMD2's official code).
        placement: where the discriminator reads features: ``"teacher"`` (frozen teacher, FastGen),
            ``"fake_score"`` (the fake-score backbone, DMD2; the GAN loss then trains it too) or
            ``"input"`` (an MLP on ``(x_t, log sigma)``, for teachers without features).
        feature_layers: submodule names (``named_modules()`` keys) of the backbone to tap.
        disc_hidden: width of the ``"input"`` head.
        guidance_scale: CFG scale ``w`` of the teacher (1 = unguided): ``D + (w - 1)(D - D_uncond)``.
        null_label: class label of the unconditional pass, or None to drop ``class_labels``.
        data_key, label_key: keys of the batch dict; labels are used when present.
        seed: seed for building the discriminator heads.
        regression_weight: weight ``lambda_reg`` of DMD's regression loss on the student steps,
            ``lambda_reg mean((G(z) - ODE_T(sigma_max z))^2)``: the student's sample is pulled towards the
            teacher's probability-flow ODE solution from the *same* noise (DMD, Yin et al. 2024, sec. 3.3:
            it anchors each noise to its own teacher sample, which distribution matching alone does not).
            0 (default) = no regression; the pairs are solved online, from each student batch's noise.
        regression_anneal_steps: 0 (default) keeps ``regression_weight`` constant; N > 0 decays it linearly
            to 0 at step N (the regression anchors each noise early, distribution matching alone sharpens
            after it).
        regression_solver, regression_grid: the ODE of the pairs: a fastgen solver name on a Karras
            (rho = 7) grid of ``regression_grid`` sigmas on ``[sigma_min, sigma_max]`` plus 0 (Heun on 18:
            35 teacher calls, the digits benchmarks' teacher sampler).
    """

    sample_shape: tuple[int, ...] = ()
    divergence: str = "js"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    student_sigma: float | None = None
    t_grid: int = 1000
    t_index_lo: int = 2
    t_index_hi: int = 998
    lambda_gan: float = 1e-3
    disc_weight: float = 1.0
    r1_weight: float = 0.0
    r1_noise: float = 0.1
    student_every: int = 5
    critic_on_student_steps: bool = True
    fake_score_weighting: str = "none"
    sigma_data: float = 0.5
    ratio_bins: int = 10
    ratio_rho: float = 0.0
    ratio_bin_space: str = "log"
    logit_clamp: float = 10.0
    ratio_clip: tuple[float, float] = (0.1, 20.0)
    dmd_eps: float = 1e-6
    placement: str = "teacher"
    feature_layers: tuple[str, ...] = ()
    disc_hidden: int = 128
    guidance_scale: float = 1.0
    null_label: int | None = None
    data_key: str = "x"
    label_key: str = "label"
    seed: int = 0
    regression_weight: float = 0.0
    regression_anneal_steps: int = 0
    regression_solver: str = "heun"
    regression_grid: int = 18

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_shape", tuple(int(s) for s in self.sample_shape))
        object.__setattr__(self, "feature_layers", tuple(str(s) for s in self.feature_layers))
        object.__setattr__(self, "ratio_clip", tuple(float(c) for c in self.ratio_clip))
        if not self.sample_shape or any(s < 1 for s in self.sample_shape):
            raise ValueError(
                f"sample_shape must be a non-empty tuple of positive ints, got {self.sample_shape}"
            )
        divergences.get(self.divergence)  # raises ValueError naming the accepted divergences
        if not (0 < self.sigma_min < self.sigma_max):
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )
        if self.student_sigma is not None and not self.student_sigma > 0:
            raise ValueError(f"student_sigma must be > 0 or null, got {self.student_sigma}")
        if self.t_grid < 2 or not (0 <= self.t_index_lo <= self.t_index_hi < self.t_grid):
            raise ValueError(
                f"need t_grid >= 2 and 0 <= t_index_lo <= t_index_hi < t_grid, got t_grid={self.t_grid}, "
                f"t_index_lo={self.t_index_lo}, t_index_hi={self.t_index_hi}"
            )
        for name in ("lambda_gan", "disc_weight", "r1_weight", "r1_noise", "dmd_eps", "regression_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.regression_solver not in SOLVERS:
            raise ValueError(f"regression_solver must be one of {sorted(SOLVERS)}, got {self.regression_solver!r}")
        for name, lo in (("regression_grid", 2), ("regression_anneal_steps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.student_every < 1:
            raise ValueError(f"student_every must be >= 1, got {self.student_every}")
        if self.fake_score_weighting not in FAKE_WEIGHTINGS:
            raise ValueError(
                f"fake_score_weighting must be one of {FAKE_WEIGHTINGS}, got {self.fake_score_weighting!r}"
            )
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement != "input" and not self.feature_layers:
            raise ValueError(
                f"placement={self.placement!r} needs feature_layers (submodule names of the backbone); "
                "use placement='input' for teachers without features"
            )
        if self.ratio_bin_space not in BIN_SPACES:
            raise ValueError(f"ratio_bin_space must be one of {BIN_SPACES}, got {self.ratio_bin_space!r}")
        if self.logit_clamp <= 0:
            raise ValueError(f"logit_clamp must be > 0, got {self.logit_clamp}")
        lo, hi = self.ratio_clip
        if not (0 < lo < hi):
            raise ValueError(f"ratio_clip must be (lo, hi) with 0 < lo < hi, got {self.ratio_clip}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(
                f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {self.guidance_scale}"
            )
        name = divergences.get(self.divergence).name
        if name not in ("reverse_kl", "alpha:0") and self.disc_weight == 0:
            raise ValueError(
                f"divergence={self.divergence!r} weights samples by the ratio r from the discriminator, "
                "so disc_weight must be > 0 (only reverse_kl works without a trained discriminator)"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FDistillConfig:
        """Build from a plain mapping (YAML); unknown keys raise ``ValueError`` listing the accepted ones."""
        check_fields(cls, d, "f-distill config keys")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-able copy."""
        out = asdict(self)
        out["sample_shape"] = list(self.sample_shape)
        out["feature_layers"] = list(self.feature_layers)
        out["ratio_clip"] = list(self.ratio_clip)
        return out
