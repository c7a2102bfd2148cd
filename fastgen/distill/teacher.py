"""The frozen f-distill teacher named by a run config's ``method.teacher``, loaded through
:func:`fastgen.models.load_model` (the one door)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["build_teacher", "teacher_recipe"]


def teacher_recipe(model: Any) -> dict[str, Any] | None:
    """``{"network": ..., "wrap": ...}`` that rebuilds a teacher-shaped network (registry names only) for
    saving the student; None for exact teachers (mixtures), whose students are plain generators."""
    if model.kind == "exact":
        return None
    cfg = model.config
    if "pipeline" in cfg:
        net = model.denoiser.model
        wrap = {"type": "diffusers", "scheduler_config": dict(cfg["scheduler"]),
                "prediction_type": getattr(model.denoiser, "prediction_type", None)}
        return {"network": {"kind": "diffusers", "model_class": type(net).__name__, "config": dict(net.config)},
                "wrap": wrap}
    return {"network": dict(cfg["network"]), "wrap": dict(cfg.get("denoiser") or {"type": "edm"})}


def build_teacher(spec: Any) -> tuple[nn.Module, dict[str, Any] | None]:
    """The frozen teacher named by a config's ``method.teacher`` and the student recipe it implies.

    ``spec`` is one of:

    - any :func:`fastgen.models.load_model` source as a string: a zoo name (``"digits-edm"``), a training
      run or checkpoint, a local Diffusers pipeline folder, a mixture spec (``"ring-mixture"``);
    - ``{"kind": "zoo", "name": NAME}``;
    - ``{"kind": "checkpoint", "path": RUN_OR_CKPT}``: a fastgen training run or one of its checkpoints
      (its ``config.yaml`` says how to build and wrap the network);
    - ``{"kind": "mixture", "mixture": "ring" | "grid" | "random", "options": {...}}``: an exact mixture;
    - ``{"kind": "diffusers", "path": PIPELINE_DIR, "prediction_type": null}``: a local Diffusers pipeline
      folder (``model_index.json``, or just ``unet/`` + ``scheduler/``; safetensors, never downloaded)
      (``model_class``/``subfolder``, if given, must agree with the folder).

    Returns ``(teacher, recipe)``; see :func:`teacher_recipe`. Teachers are in eval mode without gradients.
    """
    from fastgen.models import load_model

    if isinstance(spec, str):
        spec = {"kind": "source", "source": spec}
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(
            "method.teacher must be a model source (zoo name, run, pipeline folder, mixture spec) or a mapping "
            f"with kind: zoo | checkpoint | mixture | diffusers, got {spec!r}"
        )
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind in ("source", "zoo", "checkpoint"):
        key = {"source": "source", "zoo": "name", "checkpoint": "path"}[kind]
        model = load_model(str(spec.get(key, "")))
    elif kind == "mixture":
        model = load_model(f"mixture:{spec.get('mixture', 'ring')}", **dict(spec.get("options", {})))
        return model.denoiser.float(), None
    elif kind == "diffusers":
        model = _diffusers_teacher(spec, load_model)
    else:
        raise ValueError(f"method.teacher.kind must be 'zoo', 'checkpoint', 'mixture' or 'diffusers', got {kind!r}")
    if model.denoiser is None or model.kind in ("student", "shortcut"):
        raise ValueError(f"method.teacher: {model.name!r} is a {model.kind} model; a teacher needs an ODE denoiser")
    return model.denoiser, teacher_recipe(model)


def _diffusers_teacher(spec: dict[str, Any], load_model: Any) -> Any:
    from pathlib import Path

    from fastgen.core.denoiser import from_diffusers

    path = Path(str(spec.get("path", "")))
    if not path.is_dir():
        raise FileNotFoundError(f"method.teacher.path: Diffusers pipeline folder not found: {str(path)!r}")
    model = load_model(path)
    net = model.denoiser.model
    if spec.get("model_class") not in (None, type(net).__name__):
        raise ValueError(f"method.teacher.model_class {spec['model_class']!r} does not match the folder's "
                         f"{type(net).__name__}")
    if spec.get("prediction_type"):
        model.denoiser = from_diffusers(net, model.config["scheduler"], prediction_type=spec["prediction_type"])
    return model
