"""One-step students as generators: ``student(z, cond) -> samples``, saved as safetensors + JSON.

- :class:`OneStepStudent` (:mod:`fastgen.models.onestep`) wraps a network into a generator. Two forms:

  - ``OneStepStudent(denoiser, sigma=80.0)``: a teacher-shaped denoiser evaluated once at the
    maximum noise level, ``x = D(sigma * z, sigma, **cond)`` (f-distill/DMD2 initialise it as a
    copy of the teacher, so before training it returns the teacher's one-step prediction);
  - ``OneStepStudent(net, sigma=None)``: any generator ``net(z, **cond) -> x`` (e.g. :func:`toy_mlp`).

- :func:`save_student` / :func:`load_student` write and read ``<path>.safetensors`` and
  ``<path>.json``; the JSON holds the network *recipe* (``{"kind": NAME, **kwargs}``, a network of
  :mod:`fastgen.models.registry`), the sampling sigma, the sample shape and free-form metadata. Only
  registered names are accepted, nothing is imported by module path and no pickle is ever loaded.
- :class:`OneStepPipeline` (:mod:`fastgen.distill.onestep_pipeline`) -- a one-step pipeline with
  Diffusers conventions: ``pipe(batch_size, class_labels=..., prompt=..., num_images_per_prompt=...,
  generator=..., output_type="pil"|"np"|"pt").images``, ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import EDMDenoiser
from fastgen.models.onestep import OneStepStudent
from fastgen.models.registry import build_network, register_network
from fastgen.models.registry import wrap as registry_wrap

FORMAT = "fastgen-one-step-student"


class _ToyNet(nn.Module):
    """MLP ``(x, [c_noise]) -> out`` on flattened samples (SiLU, optional time input)."""

    def __init__(self, dim: int, hidden: int, depth: int, time_input: bool, num_classes: int) -> None:
        super().__init__()
        self.dim = dim
        self.time_input = time_input
        width = dim + (1 if time_input else 0)
        self.embed = nn.Embedding(num_classes, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(width, hidden)
        self.blocks = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor | None = None, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if self.time_input:
            flat = torch.cat([flat, c_noise.reshape(-1, 1).to(flat.dtype).expand(x.shape[0], 1)], dim=1)
        h = self.inp(flat)
        if self.embed is not None and class_labels is not None:
            h = h + self.embed(class_labels.long())
        h = self.act(h)
        for blk in self.blocks:
            h = h + self.act(blk(h))
        return self.out(h).reshape(x.shape)


def toy_mlp(
    dim: int,
    hidden: int = 128,
    depth: int = 3,
    time_input: bool = False,
    num_classes: int = 0,
    edm: bool = False,
    sigma_data: float = 0.5,
) -> nn.Module:
    """A small residual MLP on ``(B, dim)`` samples.

    - ``time_input=False, edm=False``: a generator ``net(z) -> x`` (toy one-step students).
    - ``edm=True`` (implies a time input): an :class:`EDMDenoiser` ``D(x, sigma)`` (toy fake scores).
    """
    if dim < 1 or hidden < 1 or depth < 1:
        raise ValueError(f"toy_mlp needs dim, hidden, depth >= 1, got {dim}, {hidden}, {depth}")
    net = _ToyNet(dim, hidden, depth, time_input or edm, num_classes)
    return EDMDenoiser(net, sigma_data=sigma_data) if edm else net


def build_network_from_recipe(network: Mapping[str, Any]) -> nn.Module:
    """Build a bare network from a recipe ``{"kind": NAME, **kwargs}``, ``NAME`` a network of
    :mod:`fastgen.models.registry` (``mlp``, ``unet``, ``diffusers``, ``toy_mlp``, or one a user registered)."""
    if not isinstance(network, Mapping) or "kind" not in network:
        raise ValueError(f"student network recipe must be a mapping with a 'kind', got {network!r}")
    kw = dict(network)
    return build_network(kw.pop("kind"), **kw)


def wrap_network(net: nn.Module, wrap: Mapping[str, Any] | None) -> nn.Module:
    """Apply a denoiser wrapper spec of :mod:`fastgen.models.registry`: None (bare),
    ``{"type": "edm", sigma_data, sigma_min, sigma_max}``, ``{"type": "diffusers", "scheduler_config": {...}}``."""
    return registry_wrap(net, wrap)


def bare_network(student: OneStepStudent) -> nn.Module:
    """The network whose state dict is saved: the student's net without its denoiser wrapper."""
    wrap = (student.recipe or {}).get("wrap")
    if wrap is None:
        return student.net
    inner = getattr(student.net, "net", None) or getattr(student.net, "model", None)
    if inner is None:
        raise ValueError("student recipe has a wrap, but the student's net has no .net/.model inside")
    return inner


def save_student(
    student: OneStepStudent,
    path: str | Path,
    sample_shape: tuple[int, ...],
    metadata: Mapping[str, Any] | None = None,
    half: bool = False,
) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (the bare network's weights; float16 with ``half``, as the zoo ships them,
    else as trained) and ``<path>.json``.

    The JSON is a zoo entry (``fastgen.models.load`` reads it when the network has a ``kind``)::

        {"format": "fastgen-one-step-student", "network": <recipe>,
         "denoiser": {"type": "student", "sigma": ..., "wrap": ..., ["flow_t": ...]},
         "sample_shape": [...], "metadata": {...}, ["pipeline": SOURCE]}

    ``pipeline`` (text-to-image students, from ``student.recipe["pipeline"]``): the :func:`load_model` source
    of the teacher pipeline whose tokenizer, text encoders and VAE the student uses (``digits-sd``, a folder).

    ``student.recipe = {"network": <recipe>, "wrap": <wrap spec or None>}`` must be set. Returns the paths.
    """
    from safetensors.torch import save_file

    recipe = student.recipe or {}
    if not recipe.get("network"):
        raise ValueError(
            "student.recipe must be {'network': {...}, 'wrap': ...} so that load_student can rebuild it"
        )
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    base.parent.mkdir(parents=True, exist_ok=True)
    weights = base.with_name(base.name + ".safetensors")
    meta = base.with_name(base.name + ".json")
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in bare_network(student).state_dict().items()}
    save_file(state, str(weights))
    doc = {
        "format": FORMAT,
        "network": recipe["network"],
        "denoiser": {
            "type": "student",
            "sigma": student.sigma,
            "wrap": recipe.get("wrap"),
            **({"flow_t": student.flow_t} if getattr(student, "flow_t", None) is not None else {}),
        },
        "sample_shape": list(sample_shape),
        **({"weights_dtype": "float16"} if half else {}),
        "metadata": dict(metadata or {}),
        **({"pipeline": recipe["pipeline"]} if recipe.get("pipeline") else {}),
    }
    meta.write_text(json.dumps(doc, indent=2) + "\n")
    return weights, meta


def load_student(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[OneStepStudent, dict]:
    """Load a student written by :func:`save_student`; returns ``(student in eval mode, json dict)``.

    ``path`` may name the ``.safetensors``, the ``.json`` or their common stem. No pickle is loaded.
    """
    from safetensors.torch import load_file

    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    weights = base.with_name(base.name + ".safetensors")
    meta = base.with_name(base.name + ".json")
    for p in (weights, meta):
        if not p.is_file():
            raise FileNotFoundError(f"student file not found: {p}")
    from fastgen.io.files import read_json

    doc = read_json(meta, "student JSON")  # names the file on binary bytes, bad syntax, a non-object
    if doc.get("format") != FORMAT:
        raise ValueError(
            f"{meta} is not a fastgen student (format={doc.get('format')!r}, expected {FORMAT!r})"
        )
    net = build_network_from_recipe(doc["network"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    spec = doc.get("denoiser", {})
    wrapped = wrap_network(net, spec.get("wrap"))
    recipe = {"network": doc["network"], "wrap": spec.get("wrap"),
              **({"pipeline": doc["pipeline"]} if doc.get("pipeline") else {})}
    student = OneStepStudent(wrapped, sigma=spec.get("sigma"), recipe=recipe, flow_t=spec.get("flow_t"))
    return student.to(map_location).eval().requires_grad_(False), doc

register_network("toy_mlp", toy_mlp)

from fastgen.distill.onestep_pipeline import OneStepPipeline, OneStepPipelineOutput  # noqa: E402,F401  (re-export)
