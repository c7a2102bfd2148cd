"""One-step students as generators: ``student(z, cond) -> samples``, saved as safetensors + JSON.

- :class:`OneStepStudent` wraps a network into a generator. Two forms:

  - ``OneStepStudent(denoiser, sigma=80.0)``: a teacher-shaped denoiser evaluated once at the
    maximum noise level, ``x = D(sigma * z, sigma, **cond)`` (f-distill/DMD2 initialise it as a
    copy of the teacher, so before training it returns the teacher's one-step prediction);
  - ``OneStepStudent(net, sigma=None)``: any generator ``net(z, **cond) -> x`` (e.g. :func:`toy_mlp`).

- :func:`save_student` / :func:`load_student` write and read ``<path>.safetensors`` and
  ``<path>.json``; the JSON holds the network *recipe* (a builder inside ``fastgen`` and its
  keyword arguments), the sampling sigma, the sample shape and free-form metadata. Only builders
  inside the ``fastgen`` package are accepted and no pickle is ever loaded.
- :class:`OneStepPipeline` -- a one-step Diffusers-style pipeline object:
  ``pipe(batch_size, class_labels=None, generator=None, output_type="pt"|"np"|"pil").images``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import EDMDenoiser

FORMAT = "fastgen-one-step-student"


class OneStepStudent(nn.Module):
    """A one-step generator ``z (B, *sample_shape) -> x (B, *sample_shape)``.

    Args:
        net: a denoiser ``D(x, sigma, **cond)`` when ``sigma`` is given, else a generator ``net(z, **cond)``.
        sigma: the noise level at which the denoiser is evaluated (``x = D(sigma z, sigma)``), or None.
        recipe: optional JSON-able ``{"network": <recipe>, "wrap": <spec or None>}`` that rebuilds ``net``
            (see :func:`build_network_from_recipe`, :func:`wrap_network`; needed by :func:`save_student`).

    ``forward(z, cond=None, **kw)``: ``cond`` may be a class-label tensor (passed as
    ``class_labels=``) or a mapping of keyword conditions.
    """

    def __init__(
        self, net: nn.Module, sigma: float | None = None, recipe: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        if sigma is not None and not sigma > 0:
            raise ValueError(f"student sigma must be > 0 (or None for a plain generator), got {sigma}")
        self.net = net
        self.sigma = None if sigma is None else float(sigma)
        self.recipe = dict(recipe) if recipe is not None else None

    def forward(self, z: torch.Tensor, cond: Any = None, **kw: Any) -> torch.Tensor:
        if isinstance(cond, torch.Tensor):
            kw = {"class_labels": cond, **kw}
        elif isinstance(cond, Mapping):
            kw = {**cond, **kw}
        elif cond is not None:
            raise ValueError(f"cond must be a label tensor, a mapping or None, got {type(cond).__name__}")
        if self.sigma is None:
            return self.net(z, **kw)
        return self.net(
            z * self.sigma, torch.full((z.shape[0],), self.sigma, device=z.device, dtype=z.dtype), **kw
        )


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
    """Build a bare network from a recipe: ``{"kind": ..., **kw}`` (``fastgen.models.nets.build_network``)
    or ``{"builder": "fastgen.<module>:<function>", "kwargs": {...}}`` (only inside the fastgen package)."""
    network = dict(network)
    if "kind" in network:
        from fastgen.models.nets import build_network

        return build_network(network.pop("kind"), **network)
    builder = str(network.get("builder", ""))
    mod_name, _, fn_name = builder.partition(":")
    if not (mod_name == "fastgen" or mod_name.startswith("fastgen.")) or not fn_name:
        raise ValueError(
            "student network recipe needs 'kind' (build_network) or a builder 'fastgen.<module>:<function>' "
            f"inside the fastgen package, got {builder!r}"
        )
    fn = getattr(importlib.import_module(mod_name), fn_name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"student recipe builder {builder!r} does not exist")
    return fn(**dict(network.get("kwargs", {})))


def wrap_network(net: nn.Module, wrap: Mapping[str, Any] | None) -> nn.Module:
    """Apply a denoiser wrapper spec: None (bare), ``{"type": "edm", sigma_data, sigma_min, sigma_max}``
    or ``{"type": "diffusers", "scheduler_config": {...}}``."""
    if wrap is None:
        return net
    wrap = dict(wrap)
    kind = wrap.pop("type", None)
    if kind == "edm":
        kw = {k: float(v) for k, v in wrap.items() if k in ("sigma_data", "sigma_min", "sigma_max")}
        return EDMDenoiser(net, **kw)
    if kind == "diffusers":
        from fastgen.core.denoiser import from_diffusers

        return from_diffusers(net, wrap["scheduler_config"], prediction_type=wrap.get("prediction_type"))
    raise ValueError(
        f"student wrap must be null, {{'type': 'edm', ...}} or {{'type': 'diffusers', ...}}, got {kind!r}"
    )


def bare_network(student: OneStepStudent) -> nn.Module:
    """The network whose state dict is saved: the student's net without its denoiser wrapper."""
    wrap = (student.recipe or {}).get("wrap")
    if wrap is None:
        return student.net
    inner = getattr(student.net, "net", None) or getattr(student.net, "model", None)
    if inner is None:
        raise ValueError("student recipe has a wrap, but the student's net has no .net/.model inside")
    return inner


def diffusers_model(model_class: str, config: Mapping[str, Any]) -> nn.Module:
    """A Diffusers model of class ``model_class`` (a name in ``diffusers``) built from its config dict."""
    import diffusers

    cls = getattr(diffusers, model_class, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"model_class {model_class!r} is not a Diffusers model class")
    return cls.from_config(dict(config))


def zoo_student(net: nn.Module, sigma: float | None = None, wrap: Mapping[str, Any] | None = None, **_: Any):
    """Zoo factory (``"denoiser": {"type": "fastgen.distill.student:zoo_student", ...}``): the one-step
    student around a loaded bare network, so ``fastgen.models.load("digits-fdistill-js")`` returns a
    :class:`OneStepStudent` (``student(z, class_labels) -> samples``)."""
    return OneStepStudent(wrap_network(net, wrap), sigma=sigma, recipe={"network": None, "wrap": wrap})


def save_student(
    student: OneStepStudent,
    path: str | Path,
    sample_shape: tuple[int, ...],
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (the bare network's weights) and ``<path>.json``.

    The JSON is a zoo entry (``fastgen.models.load`` reads it when the network has a ``kind``)::

        {"format": "fastgen-one-step-student", "network": <recipe>,
         "denoiser": {"type": "fastgen.distill.student:zoo_student", "sigma": ..., "wrap": ...},
         "sample_shape": [...], "metadata": {...}}

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
    state = {k: v.detach().cpu().contiguous() for k, v in bare_network(student).state_dict().items()}
    save_file(state, str(weights))
    doc = {
        "format": FORMAT,
        "network": recipe["network"],
        "denoiser": {
            "type": "fastgen.distill.student:zoo_student",
            "sigma": student.sigma,
            "wrap": recipe.get("wrap"),
        },
        "sample_shape": list(sample_shape),
        "metadata": dict(metadata or {}),
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
    doc = json.loads(meta.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(
            f"{meta} is not a fastgen student (format={doc.get('format')!r}, expected {FORMAT!r})"
        )
    net = build_network_from_recipe(doc["network"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    spec = doc.get("denoiser", {})
    wrapped = wrap_network(net, spec.get("wrap"))
    student = OneStepStudent(
        wrapped, sigma=spec.get("sigma"), recipe={"network": doc["network"], "wrap": spec.get("wrap")}
    )
    return student.to(map_location).eval().requires_grad_(False), doc


@dataclass
class OneStepPipelineOutput:
    """``images``: a ``(B, C, H, W)`` tensor in the model's range (``output_type="pt"``), a
    ``(B, H, W, C)`` float array in [0, 1] (``"np"``) or a list of PIL images (``"pil"``)."""

    images: Any


class OneStepPipeline:
    """A one-step Diffusers-style pipeline around a :class:`OneStepStudent`.

    Args:
        student: the generator.
        sample_shape: per-sample shape, e.g. ``(1, 8, 8)``.
        value_range: the model's data range, used to map to [0, 1] for ``"np"``/``"pil"`` output.

    ``pipe(batch_size=1, class_labels=None, generator=None, output_type="pt")`` draws
    ``z ~ N(0, I)`` from ``generator`` and returns a :class:`OneStepPipelineOutput` (one network call).
    """

    def __init__(
        self,
        student: OneStepStudent,
        sample_shape: tuple[int, ...],
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        self.student = student
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.value_range = value_range

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw: Any) -> OneStepPipeline:
        """Build from a student saved by :func:`save_student` (or a zoo weights stem)."""
        student, doc = load_student(path)
        return cls(student, tuple(doc["sample_shape"]), **kw)

    @property
    def device(self) -> torch.device:
        p = next(self.student.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> OneStepPipeline:
        self.student.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: torch.Tensor | list[int] | int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        **cond: Any,
    ) -> OneStepPipelineOutput:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        gdev = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn((batch_size, *self.sample_shape), generator=generator, device=gdev).to(self.device)
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
            if labels.numel() == 1:
                labels = labels.expand(batch_size)
            if labels.numel() != batch_size:
                raise ValueError(
                    f"class_labels must have 1 or batch_size={batch_size} entries, got {labels.numel()}"
                )
            cond = {"class_labels": labels, **cond}
        x = self.student(z, cond)
        if output_type == "pt":
            return OneStepPipelineOutput(x)
        lo, hi = self.value_range
        img = ((x.float() - lo) / (hi - lo)).clamp(0, 1).cpu()
        arr = img.permute(0, 2, 3, 1).numpy() if img.ndim == 4 else img.numpy()
        if output_type == "np":
            return OneStepPipelineOutput(arr)
        from PIL import Image

        pil = [
            Image.fromarray((a[..., 0] if a.shape[-1] == 1 else a).__mul__(255).round().astype("uint8"))
            for a in arr
        ]
        return OneStepPipelineOutput(pil)
