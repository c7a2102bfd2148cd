"""Distillation: one-step students by f-divergence distribution matching (f-distill; DMD2 = reverse-KL).

- :mod:`fastgen.distill.divergences` -- ``get(name)``, ``alpha(a)``: ``f(r)`` and ``h(r) = r^2 f''(r)``.
- :mod:`fastgen.distill.ratio` -- logit -> ratio clamps, per-time-bin and batch-mean normalisation.
- :mod:`fastgen.distill.discriminator` -- feature taps and heads (teacher / fake-score / (x_t, sigma)).
- :mod:`fastgen.distill.fdistill` -- :class:`FDistill`, the method for the trainer.
- :mod:`fastgen.distill.student` -- :class:`OneStepStudent`, save/load, :class:`OneStepPipeline`.
- :mod:`fastgen.distill.t2i` -- :class:`TextToImageDistill`: text-to-image pipelines (prompts, CFG, latents).
- :mod:`fastgen.distill.instaflow` -- InstaFlow: reflow of a text-to-image pipeline and its one-step distillation.
"""

from fastgen.distill import divergences
from fastgen.distill.boss import from_config as _boss_from_config
from fastgen.distill.build import from_config as _fdistill_from_config
from fastgen.distill.fdistill import FDistill, FDistillConfig, dmd_gradient, pseudo_target_loss
from fastgen.distill.instaflow import from_config as _instaflow_from_config
from fastgen.distill.sfd import from_config as _sfd_from_config
from fastgen.distill.student import OneStepPipeline, OneStepStudent, load_student, save_student, toy_mlp
from fastgen.distill.t2i import TextToImageDistill  # also registers the "t2i" data set
from fastgen.distill.uni_instruct import from_config as _uni_instruct_from_config
from fastgen.train.method import register_method

register_method("fdistill", _fdistill_from_config)
register_method("uni_instruct", _uni_instruct_from_config)  # Uni-Instruct (fastgen.distill.uni_instruct)
register_method("sfd", _sfd_from_config)  # SFD few-step students (fastgen.distill.sfd)
register_method("boss", _boss_from_config)  # BOSS straightening (fastgen.distill.boss)
register_method("instaflow", _instaflow_from_config)  # text-conditioned reflow (fastgen.distill.instaflow)

__all__ = [
    "divergences",
    "FDistill",
    "FDistillConfig",
    "dmd_gradient",
    "pseudo_target_loss",
    "OneStepStudent",
    "OneStepPipeline",
    "TextToImageDistill",
    "load_student",
    "save_student",
    "toy_mlp",
]
