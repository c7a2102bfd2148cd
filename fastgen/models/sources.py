"""The one door: ``load_model(source) -> LoadedModel`` for every model fastgen serves.

``source`` is one of

- a zoo name (``fastgen.models.list_models()``: ``digits-edm``, ``digits-gft``, ``digits-shortcut``,
  ``digits-fdistill-js`` ...), the name of a shipped Diffusers pipeline folder
  (``fastgen/models/weights/pipelines/<name>/``, e.g. ``digits-sd``, ``digits-sd3``) or of a shipped student
  folder (``fastgen/models/weights/<name>/student.json``, e.g. ``digits-sd-fdistill-js``);
- a training run directory (``config.yaml`` + ``checkpoints/``) or one of its checkpoints
  (``RUN/checkpoints/latest``, ``RUN/checkpoints/step_*``): the EMA network, wrapped as the run's
  method prescribes (``edm``, ``flow``, ``gft``; an ``fdistill`` run gives its one-step student);
- an exported student (``DIR/student.safetensors`` + ``student.json``, the directory, or either file);
- a local Diffusers pipeline folder (``model_index.json``): ``UNet2DModel`` pipelines (DDPM),
  SD-style ``UNet2DConditionModel`` + text encoder + VAE, SD3-style flow transformers, Flux
  (``FluxTransformer2DModel`` + CLIP + T5 + VAE; the state is the unpacked latent ``(C, H, W)``, packed 2x2
  around the transformer by :mod:`fastgen.models.flux`); or a partial folder with ``unet/`` (or
  ``transformer/``) and ``scheduler/`` only;
- a mixture spec: ``ring-mixture``, ``grid-mixture``, ``random-mixture`` (or ``mixture:ring`` ...;
  options as keywords, e.g. ``load_model("mixture:random", dim=4, num_modes=3)``): the exact denoiser.

A :class:`LoadedModel` carries what callers would otherwise guess: the denoiser (EDM contract
``D(x, sigma, **cond) -> x0``, VE sigma) or the one-step generator, the kind, the per-sample shape,
the sigma range, the conditioning (``"none"``, ``"class"``, ``"prompt"``), :meth:`LoadedModel.condition`
(user inputs -> condition tensors, computed once under ``no_grad`` and detached), :meth:`LoadedModel.decode`
(latents -> images in [-1, 1]) and :meth:`LoadedModel.identity` (name + sha256 of config and sigma range).
Nothing else in fastgen parses model folders or guesses shapes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.core.ranges import check_schedule_fits  # noqa: F401  (re-exported: part of this module's API)
from fastgen.models import zoo

__all__ = ["LoadedModel", "load_model", "KINDS", "CONDITIONING", "MIXTURES", "PIPELINES_DIR",
           "check_schedule_fits", "source_files_key"]

#: What a loaded model is: ODE teacher, one-step student, shortcut model, GFT model, exact denoiser.
KINDS = ("teacher", "student", "shortcut", "gft", "exact")
#: Which user inputs a model takes.
CONDITIONING = ("none", "class", "prompt")
MIXTURES = ("ring", "grid", "random")
PIPELINES_DIR = zoo.WEIGHTS_DIR / "pipelines"


@dataclass
class LoadedModel:
    """A model ready to sample, schedule or distill.

    Attributes:
        name: the source as given (zoo name or path).
        kind: one of :data:`KINDS`.
        shape: per-sample shape of the state the denoiser/generator sees (latent shape for latent pipelines).
        sigma_min, sigma_max: the VE sigma range the model was trained on (positive, finite).
        conditioning: one of :data:`CONDITIONING`.
        num_classes: number of classes for class-conditional models, else None.
        denoiser: ``D(x, sigma, **cond) -> x0`` (None for students).
        generator: a one-step student ``G(z, cond) -> x`` (students only).
        shortcut: the raw shortcut network (shortcut models only; ``shortcut_sample`` takes it).
        config: JSON-able description of the model; its sha256 is the identity's fingerprint.
        info: free-form details (pipeline class, checkpoint path, ...), not part of the identity.
        encode_prompt: prompt models: ``texts -> condition keywords`` (use :meth:`condition`).
        decoder: latent pipelines: ``latents -> images`` (use :meth:`decode`).
        label: the identity's name (a run's or folder's name); default the source's last path component.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    conditioning: str = "none"
    num_classes: int | None = None
    denoiser: Any = None
    generator: Any = None
    shortcut: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    encode_prompt: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    label: str | None = None  # the identity's name (run / folder name); default: the source's last component

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}, got {self.conditioning!r}")
        if not (0 < self.sigma_min < self.sigma_max and math.isfinite(self.sigma_max)):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")

    @property
    def sigma_range(self) -> tuple[float, float]:
        return (float(self.sigma_min), float(self.sigma_max))

    @property
    def latent(self) -> bool:
        """True when samples must go through :meth:`decode` to become images."""
        return self.decoder is not None

    def identity(self) -> dict[str, Any]:
        """``{"name", "fingerprint", "sigma_min", "sigma_max"}``; the fingerprint is the sha256 of the
        config and the sigma range (stable across runs and machines)."""
        doc = {"config": self.config, "sigma_range": [round(v, 10) for v in self.sigma_range]}
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
        name = self.label or (Path(self.name).name if Path(self.name).exists() else self.name)
        return {"name": name,
                "fingerprint": digest, "sigma_min": self.sigma_range[0], "sigma_max": self.sigma_range[1]}

    def condition(
        self,
        n: int,
        class_labels: Sequence[int] | torch.Tensor | int | str | None = None,
        prompts: Sequence[str] | str | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance: float = 1.0,
        device: str | torch.device = "cpu",
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Condition tensors for ``n`` samples: ``(cond, uncond)``, computed once under ``no_grad``, detached.

        - class models: ``class_labels`` is an int, a sequence/tensor of ``n`` ints, or ``None``/``"cycle"``
          (0..K-1 repeated); ``uncond = {"class_labels": None}`` (fastgen's unconditional convention);
        - prompt models: ``prompts`` is one string or ``n`` strings (repeated cyclically up to ``n``);
          ``uncond`` holds the embeddings of ``negative_prompt`` (default ``""``);
        - ``uncond`` is None when ``guidance == 1`` (one pass). An input that does not apply to this
          model raises ``ValueError`` naming it.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        if self.kind == "student" and guidance != 1.0:
            raise ValueError(f"guidance does not apply to {self.name} (a one-step student); accepted: 1.0")
        if self.conditioning != "prompt" and (prompts is not None or negative_prompt is not None):
            raise ValueError(f"prompts/negative_prompt do not apply to {self.name} (conditioning: {self.conditioning})")
        if self.conditioning != "class" and class_labels not in (None, "cycle"):
            raise ValueError(f"class labels do not apply to {self.name} (conditioning: {self.conditioning})")
        if self.conditioning == "none":
            if guidance != 1.0:
                raise ValueError(f"guidance needs a conditional model; {self.name} is unconditional")
            return {}, None
        if self.conditioning == "class":
            labels = _labels(n, self.num_classes or 0, class_labels, device)
            return {"class_labels": labels}, (None if guidance == 1.0 else {"class_labels": None})
        if prompts is None:
            raise ValueError(f"{self.name} is a text-to-image model: give prompts (--prompt / --prompts)")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError("prompts must not be empty")
        texts = [texts[i % len(texts)] for i in range(n)]
        with torch.no_grad():
            cond = {k: v.detach().to(device) for k, v in self.encode_prompt(texts).items()}
            uncond = None
            if guidance != 1.0:
                neg = [negative_prompt or ""] if not isinstance(negative_prompt, list) else negative_prompt
                neg = [neg[i % len(neg)] for i in range(n)]
                uncond = {k: v.detach().to(device) for k, v in self.encode_prompt(neg).items()}
        return cond, uncond

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from samples: the VAE decoder for latent pipelines, else ``x`` clamped."""
        if self.decoder is None:
            return x.clamp(-1, 1)
        with torch.no_grad():
            return self.decoder(x).clamp(-1, 1)


def _labels(n: int, k: int, label: Any, device: str | torch.device) -> torch.Tensor:
    if label is None or (isinstance(label, str) and label == "cycle"):
        return torch.arange(n, device=device) % k
    if isinstance(label, (int, str)) and not isinstance(label, bool):
        try:
            c = int(label)
        except ValueError as err:
            raise ValueError(f"class label must be an integer in [0, {k}) or 'cycle', got {label!r}") from err
        out = torch.full((n,), c, device=device, dtype=torch.long)
    else:
        out = torch.as_tensor(label, device=device).long().reshape(-1)
        if out.numel() != n:
            raise ValueError(f"class labels must have {n} entries, got {out.numel()}")
    if out.numel() and not (0 <= int(out.min()) and int(out.max()) < k):
        raise ValueError(f"class labels must be in [0, {k}), got {out.tolist()[:8]}")
    return out


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def source_files_key(source: str | Path) -> str:
    """A cheap identity of a model source's *files*, for cache keys (16 hex digits).

    :meth:`LoadedModel.identity` fingerprints the config and sigma range only, so a retrained run or pipeline
    folder with the same config has the same identity; caches of what a model computed (coupling pairs,
    teacher samples, prompt embeddings) key on this as well. For a folder (a path, or the name of a shipped
    pipeline folder) and for a file: the relative path, size and mtime (whole seconds) of every ``*.json`` and
    ``*.safetensors`` file in it; any other source (a zoo name, a mixture spec) is keyed by its string, which
    names fixed contents for an installed version.
    """
    name = str(source)
    path = PIPELINES_DIR / name if (PIPELINES_DIR / name).is_dir() else Path(name)
    if path.is_dir():
        files, root = sorted(path.rglob("*.json")) + sorted(path.rglob("*.safetensors")), path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        files, root = [], path
    stats = [(str(f.relative_to(root)), f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    return hashlib.sha256(json.dumps([name, stats], default=str).encode()).hexdigest()[:16]


def load_model(source: str | Path, device: str | torch.device = "cpu", **options: Any) -> LoadedModel:
    """Load ``source`` (see the module docstring); ``FileNotFoundError``/``ValueError`` naming what is accepted."""
    from fastgen.models import source_loaders as files

    src = str(source)
    if isinstance(source, str) and _mixture_name(src) is not None:
        return _load_mixture(_mixture_name(src), options)
    if options:
        raise ValueError(f"options {sorted(options)} apply to mixture specs only; {src!r} takes none")
    if isinstance(source, str) and src in zoo.list_models():
        return files.load_zoo(src, device)
    if isinstance(source, str) and (PIPELINES_DIR / src / "model_index.json").is_file():
        return files.load_pipeline(PIPELINES_DIR / src, device, name=src)
    if isinstance(source, str) and "/" not in src and (zoo.WEIGHTS_DIR / src / "student.json").is_file():
        return files.load_student_files(zoo.WEIGHTS_DIR / src, device, name=src)  # shipped student folders
    path = Path(src)
    if not path.exists() and path.suffix == "" and path.with_suffix(".safetensors").is_file():
        path = path.with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(
            f"model source {src!r} is neither a zoo model ({', '.join(available())}), a mixture spec "
            f"({', '.join(m + '-mixture' for m in MIXTURES)}) nor an existing path"
        )
    if path.is_dir() and ((path / "model_index.json").is_file() or files.is_model_folder(path)):
        return files.load_pipeline(path, device, name=src)
    if files.is_student(path):
        return files.load_student_files(path, device, name=src)
    run_ckpt = files.run_and_checkpoint(path)
    if run_ckpt is not None:
        return files.load_run(*run_ckpt, device=device, name=src)
    raise ValueError(
        f"model source {src!r}: a path must be a Diffusers pipeline folder (model_index.json), an exported "
        "student (student.safetensors + student.json), or a training run / checkpoint (config.yaml, "
        "checkpoints/latest, checkpoints/step_*)"
    )


def available() -> list[str]:
    """Zoo names and shipped pipeline names that :func:`load_model` accepts by name."""
    pipes = sorted(p.name for p in PIPELINES_DIR.glob("*") if (p / "model_index.json").is_file())
    students = sorted(p.name for p in zoo.WEIGHTS_DIR.glob("*") if (p / "student.json").is_file())
    return zoo.list_models() + pipes + students


def _mixture_name(src: str) -> str | None:
    if src.startswith("mixture:"):
        return src.split(":", 1)[1]
    if src.endswith("-mixture") and src[: -len("-mixture")] in MIXTURES:
        return src[: -len("-mixture")]
    return None


def _load_mixture(which: str, options: dict[str, Any]) -> LoadedModel:
    """The exact denoiser of a :mod:`fastgen.data.toy` mixture (class = component index)."""
    from fastgen.data import toy

    builders = {"ring": toy.ring_mixture, "grid": toy.grid_mixture, "random": toy.random_mixture}
    if which not in builders:
        raise ValueError(f"mixture must be one of {MIXTURES}, got {which!r}")
    mix = builders[which](**options)
    den = mix.denoiser()
    dim = int(mix.means.shape[1])
    return LoadedModel(
        name=f"{which}-mixture", kind="exact", shape=(dim,), sigma_min=0.002, sigma_max=80.0,
        conditioning="class", num_classes=int(mix.means.shape[0]), denoiser=den,
        config={"mixture": which, "options": {k: (v.tolist() if isinstance(v, torch.Tensor) else v)
                                              for k, v in options.items()}},
        info={"mixture": mix},
    )


def frozen(module: nn.Module, device: str | torch.device) -> nn.Module:
    """``module`` on ``device`` in eval mode with gradients off."""
    return module.to(device).eval().requires_grad_(False)
