"""The frozen f-distill teacher named by a run config's ``method.teacher``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def build_teacher(spec: Any) -> tuple[nn.Module, dict[str, Any] | None]:
    """The frozen teacher named by a config's ``method.teacher`` and the student recipe it implies.

    ``spec`` is one of:

    - ``"digits-edm"`` or ``{"kind": "zoo", "name": "digits-edm"}``: a model of :mod:`fastgen.models.zoo`;
    - ``{"kind": "checkpoint", "path": CKPT_DIR, "network": {"kind": ...}, "denoiser": {"type": "edm"},
      "ema": "net"}``: the EMA weights of a fastgen trainer checkpoint (your own teacher run);
    - ``{"kind": "mixture", "mixture": "ring" | "grid" | "random", "options": {...}}``: an exact mixture;
    - ``{"kind": "diffusers", "path": DIR, "model_class": "UNet2DModel", "subfolder": "unet",
      "scheduler_config": DIR/scheduler/scheduler_config.json or a dict, "prediction_type": null}``:
      a local Diffusers model (safetensors only, never downloaded) as a VP/flow denoiser.

    Returns ``(teacher, recipe)`` where ``recipe = {"network": ..., "wrap": ...}`` rebuilds a
    teacher-shaped network for saving the student (None for exact teachers).
    """
    import json
    from pathlib import Path

    if isinstance(spec, str):
        spec = {"kind": "zoo", "name": spec}
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(
            "method.teacher must be a zoo model name or a mapping with kind: zoo | mixture | diffusers, "
            f"got {spec!r}"
        )
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "zoo":
        from fastgen.models import zoo

        name = spec.get("name")
        info = zoo.model_info(name)  # ValueError naming the available models
        return zoo.load(name), {"network": info["network"], "wrap": info.get("denoiser", {"type": "edm"})}
    if kind == "checkpoint":
        from fastgen.distill.student import build_network_from_recipe, wrap_network
        from fastgen.models.zoo import ema_state_from_checkpoint

        if "network" not in spec:
            raise ValueError("method.teacher (kind: checkpoint) needs 'network' (the build_network kwargs)")
        net = build_network_from_recipe(spec["network"])
        net.load_state_dict(ema_state_from_checkpoint(spec.get("path", ""), spec.get("ema", "net")))
        wrap = dict(spec.get("denoiser", {"type": "edm"}))
        return wrap_network(net, wrap), {"network": dict(spec["network"]), "wrap": wrap}
    if kind == "mixture":
        from fastgen.data import toy

        builders = {"ring": toy.ring_mixture, "grid": toy.grid_mixture, "random": toy.random_mixture}
        which = spec.get("mixture", "ring")
        if which not in builders:
            raise ValueError(f"method.teacher.mixture must be one of {sorted(builders)}, got {which!r}")
        return builders[which](**dict(spec.get("options", {}))).denoiser().float(), None
    if kind == "diffusers":
        import diffusers

        from fastgen.core.denoiser import from_diffusers

        path = Path(str(spec.get("path", "")))
        if not path.is_dir():
            raise FileNotFoundError(f"method.teacher.path: Diffusers model folder not found: {str(path)!r}")
        cls_name = spec.get("model_class", "UNet2DModel")
        cls = getattr(diffusers, cls_name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(f"method.teacher.model_class {cls_name!r} is not a Diffusers model class")
        sub = spec.get("subfolder", "unet")
        model = cls.from_pretrained(str(path), subfolder=sub, use_safetensors=True, local_files_only=True)
        sched = spec.get("scheduler_config", str(path / "scheduler" / "scheduler_config.json"))
        if not isinstance(sched, Mapping):
            sp = Path(str(sched))
            if not sp.is_file():
                raise FileNotFoundError(f"method.teacher.scheduler_config not found: {str(sp)!r}")
            sched = json.loads(sp.read_text())
        pred = spec.get("prediction_type")
        teacher = from_diffusers(model, dict(sched), prediction_type=pred)
        recipe = {
            "network": {"kind": "diffusers", "model_class": cls_name, "config": dict(model.config)},
            "wrap": {"type": "diffusers", "scheduler_config": dict(sched), "prediction_type": pred},
        }
        return teacher, recipe
    raise ValueError(
        f"method.teacher.kind must be 'zoo', 'checkpoint', 'mixture' or 'diffusers', got {kind!r}"
    )


__all__ = ["build_teacher"]
