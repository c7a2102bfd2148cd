"""Resolve what ``--model`` names into something that samples (CLI layer: may import everything).

A *source* is one of

- an embedded model name (``fastgen.models.list_models()``: ``digits-edm``, ``digits-shortcut``,
  ``digits-gft``, ``digits-fdistill-*``),
- a local Diffusers pipeline folder (has ``model_index.json``; unconditional ``UNet2DModel``
  pipelines such as ``DDPMPipeline`` are sampled directly through the VP adapter),
- a checkpoint of fastgen's trainer (a run folder with ``config.yaml`` and ``checkpoints/``, or one
  ``checkpoints/step_*`` folder): the EMA network wrapped as the run's method prescribes.

The result is a :class:`LoadedModel`: its ``kind`` says which samplers apply (``denoiser`` for
ODE/Restart samplers, ``shortcut``, ``student``) and ``shape`` is one sample's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class LoadedModel:
    """A model ready to sample. ``denoiser`` is an EDM-contract denoiser when ``kind == "denoiser"``."""

    name: str
    kind: str  # "denoiser" | "shortcut" | "student" | "gft"
    shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    num_classes: int | None = None
    denoiser: Any = None
    shortcut: Any = None
    student: Any = None
    info: dict[str, Any] = field(default_factory=dict)


def _num_classes(info: dict[str, Any]) -> int | None:
    net = info.get("network", {})
    n = net.get("num_classes") or info.get("num_classes")
    return int(n) if n else None


def _shape(info: dict[str, Any]) -> tuple[int, ...]:
    shape = info.get("shape")
    if shape:
        return tuple(int(s) for s in shape)
    return (1, 8, 8)  # every embedded model is a digits model


def load_embedded(name: str, device: str = "cpu") -> LoadedModel:
    from fastgen.models import zoo

    info = zoo.model_info(name)
    from fastgen.distill.student import OneStepStudent
    from fastgen.samplers.shortcut import ShortcutDenoiser

    model = zoo.load(name, device=device)
    den_spec = info.get("denoiser", {}) or {}
    sigma_min = float(den_spec.get("sigma_min", info.get("sigma_min", 0.002)))
    sigma_max = float(den_spec.get("sigma_max", info.get("sigma_max", 80.0)))
    common = dict(name=name, shape=_shape(info), sigma_min=sigma_min, sigma_max=sigma_max,
                  num_classes=_num_classes(info), info=info)
    if isinstance(model, ShortcutDenoiser):
        return LoadedModel(kind="shortcut", shortcut=model.model, denoiser=model, **common)
    if isinstance(model, OneStepStudent):
        return LoadedModel(kind="student", student=model, **common)
    if "beta" in info.get("network", {}).get("scalars", []):
        return LoadedModel(kind="gft", denoiser=model, **common)  # guidance through beta = 1/w, one pass
    return LoadedModel(kind="denoiser", denoiser=model, **common)


def load_diffusers_folder(path: Path, device: str = "cpu") -> LoadedModel:
    from diffusers import DiffusionPipeline

    from fastgen.core.denoiser import from_diffusers

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    unet = getattr(pipe, "unet", None)
    if unet is None or type(unet).__name__ != "UNet2DModel":
        raise ValueError(
            f"{path} is a {type(pipe).__name__}; `fastgen sample` samples unconditional UNet2DModel pipelines "
            "(e.g. DDPMPipeline) directly. For text-to-image pipelines swap in "
            "fastgen.samplers.FastgenScheduler/RestartScheduler (see README)."
        )
    den = from_diffusers(unet.to(device), pipe.scheduler.config)
    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    return LoadedModel(name=str(path), kind="denoiser", shape=(c.in_channels, size, size),
                       sigma_min=float(den.sigma_min), sigma_max=float(den.sigma_max), denoiser=den,
                       info={"pipeline": type(pipe).__name__})


def load_trainer_checkpoint(path: Path, device: str = "cpu") -> LoadedModel:
    from fastgen.core.denoiser import EDMDenoiser
    from fastgen.models.nets import build_network
    from fastgen.models.zoo import ema_state_from_checkpoint
    from fastgen.train import load_config
    from fastgen.train.checkpoint import latest_checkpoint

    if (path / "config.yaml").is_file():
        run, ckpt = path, latest_checkpoint(path / "checkpoints")
    else:
        run, ckpt = path.parent.parent, path
    if ckpt is None or not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} holds no trainer checkpoint (expected config.yaml and checkpoints/)")
    cfg = load_config(str(run / "config.yaml"))
    method = dict(cfg.method)
    if method.get("name", "edm") != "edm":
        raise ValueError(f"sampling a {method.get('name')!r} checkpoint is not supported; export it to the zoo")
    net_kw = dict(cfg.network)
    net = build_network(net_kw.pop("kind"), **net_kw)
    net.load_state_dict(ema_state_from_checkpoint(ckpt, "net"))
    den = EDMDenoiser(net.to(device).eval(), sigma_data=float(method.get("sigma_data", 0.5)))
    n_cls = net_kw.get("num_classes")
    return LoadedModel(name=str(ckpt), kind="denoiser", shape=(1, 8, 8), sigma_min=0.002, sigma_max=80.0,
                       num_classes=int(n_cls) if n_cls else None, denoiser=den.requires_grad_(False),
                       info={"checkpoint": str(ckpt)})


def resolve_model(source: str, device: str = "cpu") -> LoadedModel:
    """Load ``source`` (embedded name, Diffusers pipeline folder or trainer checkpoint)."""
    from fastgen.models import zoo

    if source in zoo.list_models():
        return load_embedded(source, device)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"--model {source!r} is neither an embedded model ({', '.join(zoo.list_models())}) nor an existing path"
        )
    if (path / "model_index.json").is_file():
        return load_diffusers_folder(path, device)
    if (path / "config.yaml").is_file() or (path / "state.json").is_file():
        return load_trainer_checkpoint(path, device)
    raise ValueError(
        f"--model {source!r}: a folder must be a Diffusers pipeline (model_index.json) or a fastgen "
        "trainer run/checkpoint (config.yaml / state.json)"
    )


def class_labels_for(n: int, model: LoadedModel, label: str | int | None, device: str) -> torch.Tensor | None:
    """Labels for ``n`` samples: ``None`` for unconditional models, else cycling 0..K-1 or a fixed class."""
    if model.num_classes is None:
        return None
    if label is None or label == "cycle":
        return torch.arange(n, device=device) % model.num_classes
    k = int(label)
    if not 0 <= k < model.num_classes:
        raise ValueError(f"--class-label must be in [0, {model.num_classes}) or 'cycle', got {label}")
    return torch.full((n,), k, device=device, dtype=torch.long)
