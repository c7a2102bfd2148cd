"""Building :class:`~fastgen.distill.fdistill.FDistill` from a run config (the ``fdistill`` method)."""

from __future__ import annotations

from typing import Any

from fastgen.core.denoiser import EDMDenoiser
from fastgen.distill.fconfig import FDistillConfig
from fastgen.distill.fdistill import FDistill
from fastgen.distill.student import OneStepStudent
from fastgen.distill.teacher import build_teacher

__all__ = ["from_config"]


def from_config(cfg: Any, method_cls: type | None = None, config_cls: type | None = None) -> FDistill:
    """Build :class:`FDistill` from a :class:`fastgen.train.config.TrainConfig`.

    ``cfg.method`` holds ``name: fdistill``, ``teacher`` (see :func:`fastgen.distill.teacher.build_teacher`), optional
    ``class_conditional`` (default: true for digits data) and any :class:`FDistillConfig` field.
    ``sample_shape`` defaults to the data's (``(1, 8, 8)`` or ``(64,)`` for digits, ``(d,)`` for a
    mixture); ``sigma_min``/``sigma_max`` default to the teacher's range when it declares one.
    For teachers without parameters (exact mixtures) the student and the fake score are EDM-wrapped
    ``cfg.network`` nets (``fastgen.models.nets.build_network``), the student a fresh one evaluated at
    ``student_sigma``.
    """
    from fastgen.models.nets import build_network

    if cfg.data.name == "t2i":  # text-to-image pipelines: prompts, CFG, latents (fastgen.distill.t2i)
        from fastgen.distill.t2i import from_config as t2i_from_config

        return t2i_from_config(cfg)
    kw = {k: v for k, v in cfg.method.items() if k != "name"}
    if "teacher" not in kw:
        raise ValueError("method.teacher is required (a zoo name such as 'digits-edm', or a mapping)")
    teacher, recipe = build_teacher(kw.pop("teacher"))
    class_conditional = bool(kw.pop("class_conditional", cfg.data.name == "digits"))
    if "sample_shape" not in kw:
        if cfg.data.name == "digits":
            kw["sample_shape"] = (64,) if cfg.data.options.get("flatten", False) else (1, 8, 8)
        elif cfg.data.name == "mixture":
            from fastgen.train.batches import build_dataset

            kw["sample_shape"] = tuple(build_dataset(cfg)["x"].shape[1:])
        else:
            raise ValueError("method.sample_shape is required when data.name is 'none'")
    for key in ("sigma_min", "sigma_max"):
        v = getattr(teacher, key, None)
        if key not in kw and v is not None:
            kw[key] = float(v)
    fcfg = (config_cls or FDistillConfig).from_dict(kw)  # method_cls/config_cls: subclasses (Uni-Instruct)
    s_sigma = fcfg.student_sigma if fcfg.student_sigma is not None else fcfg.sigma_max
    student = fake = None
    if not any(True for _ in teacher.parameters()):
        kind = cfg.network["kind"]
        net_kw = {k: v for k, v in cfg.network.items() if k != "kind"}
        recipe = {"network": dict(cfg.network), "wrap": {"type": "edm", "sigma_data": fcfg.sigma_data}}
        student_net = EDMDenoiser(build_network(kind, **net_kw), sigma_data=fcfg.sigma_data)
        student = OneStepStudent(student_net, s_sigma, recipe)
        fake = EDMDenoiser(build_network(kind, **net_kw), sigma_data=fcfg.sigma_data)
    method = (method_cls or FDistill)(
        teacher, fcfg, student=student, fake_score=fake, class_conditional=class_conditional
    )
    if method.student.recipe is None:
        method.student.recipe = recipe
    return method
