"""Shared pieces of the distillers that fine-tune the teacher itself onto a few-step Euler grid (SFD, BOSS).

- :func:`load_teacher`: any :func:`fastgen.models.load_model` source as a frozen ODE teacher, with the recipe
  that rebuilds its network (registry names only).
- :func:`student_copy`: the trainable student: a copy of the teacher's denoiser, of another model's
  (``init``, required for exact teachers, which have no network), or a step-conditioned copy (SFD-v).
- :class:`ConditionSampler`: per-batch conditions (uniform class labels; rows of fixed prompt embeddings).
- :class:`StudentOfTeacherMethod`: the Method protocol's bookkeeping they share (network ``student``,
  optimizer ``main``, frozen ``teacher``, no EMA, no extra state unless a subclass keeps some).
- :func:`save_fewstep` / :func:`export_fewstep`: write a :class:`~fastgen.models.fewstep.FewStepStudent` as a
  student file pair or a zoo model (``load_model`` and ``fastgen sample --model`` serve both).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.models.fewstep import FewStepStudent

__all__ = ["load_teacher", "student_copy", "ConditionSampler", "save_fewstep", "export_fewstep", "FORMAT"]

FORMAT = "fastgen-one-step-student"  # the student file format load_model recognises (few-step students too)


def load_teacher(source: Any) -> tuple[Any, dict[str, Any] | None]:
    """``(LoadedModel, recipe)`` of the teacher ``source`` (a load_model source string: zoo name, run,
    pipeline folder, mixture spec). Refuses students and shortcut models (they have no ODE denoiser)."""
    from fastgen.distill.teacher import teacher_recipe
    from fastgen.models import load_model

    if not isinstance(source, (str, Path)) or not str(source):
        raise ValueError(f"method.teacher must be a model source (zoo name, run, pipeline folder, mixture spec), "
                         f"got {source!r}")
    model = load_model(str(source))
    if model.denoiser is None or model.kind in ("student", "shortcut"):
        raise ValueError(f"method.teacher: {model.name!r} is a {model.kind} model; a teacher needs an ODE denoiser")
    model.denoiser.eval().requires_grad_(False)
    return model, teacher_recipe(model)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def student_copy(
    model: Any, recipe: dict[str, Any] | None, init: str | None = None, step_scalar: str | None = None
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The trainable student denoiser and its recipe.

    - default: a deep copy of the teacher's denoiser (SFD/BOSS fine-tune the teacher itself);
    - ``init``: a copy of the denoiser of another load_model source (needed for exact teachers);
    - ``step_scalar`` (SFD-v): the network rebuilt with one more scalar condition of that name (fastgen's
      ``mlp``/``unet`` networks), the teacher's weights loaded and the new embedding's output zeroed, so the
      student equals the teacher at iteration 0.
    """
    from fastgen.distill.teacher import teacher_recipe

    src = model
    if init is not None:
        src, recipe = load_teacher(init)
    if not _has_params(src.denoiser):
        raise ValueError(f"method.teacher {model.name!r} is an exact denoiser without a network to fine-tune; "
                         "give method.init (a load_model source whose network starts the student)")
    if step_scalar is None:
        return copy.deepcopy(src.denoiser).train().requires_grad_(True), recipe
    return _step_conditioned(src, recipe or teacher_recipe(src), step_scalar)


def _step_conditioned(src: Any, recipe: dict[str, Any], scalar: str) -> tuple[nn.Module, dict[str, Any]]:
    from fastgen.models.registry import build_network
    from fastgen.models.registry import wrap as apply_wrapper
    from fastgen.train.gft import zero_init_beta

    net_spec = dict(recipe.get("network") or {})
    if net_spec.get("kind") not in ("mlp", "unet"):
        raise ValueError(f"method.step_condition needs a fastgen 'mlp' or 'unet' network (scalar conditions); "
                         f"{src.name!r} has {net_spec.get('kind')!r}; set step_condition: false")
    net_spec["scalars"] = [*net_spec.get("scalars", []), scalar]
    kw = {k: v for k, v in net_spec.items() if k != "kind"}
    net = build_network(net_spec["kind"], **kw)
    inner = getattr(src.denoiser, "net", None)
    missing, unexpected = net.load_state_dict(inner.state_dict(), strict=False)
    bad = [k for k in missing if not k.startswith(f"cond.scalar_embed.{scalar}")]
    if bad or unexpected:
        raise ValueError(f"the step-conditioned network does not fit {src.name!r}: missing {bad}, "
                         f"unexpected {list(unexpected)}")
    zero_init_beta(net, scalar)
    new = {"network": net_spec, "wrap": recipe.get("wrap")}
    return apply_wrapper(net, new["wrap"]).train().requires_grad_(True), new


class StudentOfTeacherMethod:
    """Method bookkeeping for a trainable ``self.student`` fine-tuned against a frozen ``self.teacher``.

    One optimizer ``"main"`` over ``"student"``, no EMA, frozen ``"teacher"``; no extra state (subclasses
    that carry batches across trainer steps override ``state_dict`` / ``load_state_dict``).
    """

    student: nn.Module
    teacher: nn.Module

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizer_groups(self) -> dict[str, list[str]]:
        return {"main": ["student"]}

    def ema_networks(self) -> list[str]:
        return []

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


class ConditionSampler:
    """Per-batch conditions of a teacher: uniform class labels in ``[0, num_classes)`` for class models,
    uniformly drawn rows of the embeddings of ``prompts`` for text models, nothing otherwise."""

    def __init__(self, model: Any, class_conditional: bool | None = None, prompts: Sequence[str] | None = None):
        self.kind = model.conditioning
        if class_conditional is False or (self.kind == "class" and not model.num_classes):
            self.kind = "none"
        if class_conditional and model.conditioning != "class":
            raise ValueError(f"method.class_conditional: {model.name!r} takes no class labels "
                             f"(conditioning: {model.conditioning})")
        self.num_classes = int(model.num_classes or 0)
        self.table: dict[str, torch.Tensor] = {}
        if self.kind == "prompt":
            if not prompts:
                raise ValueError(f"method.prompts: {model.name!r} is a text-to-image model; give a list of prompts")
            cond, _ = model.condition(len(prompts), prompts=list(prompts))
            self.table = {k: v.detach() for k, v in cond.items()}
        elif prompts:
            raise ValueError(f"method.prompts do not apply to {model.name!r} (conditioning: {model.conditioning})")

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> dict[str, Any]:
        """Conditions for ``n`` rows, drawn on ``generator``'s device."""
        if self.kind == "class":
            lab = torch.randint(0, self.num_classes, (n,), generator=generator, device=generator.device)
            return {"class_labels": lab.to(device)}
        if self.kind == "prompt":
            rows = next(iter(self.table.values())).shape[0]
            idx = torch.randint(0, rows, (n,), generator=generator, device=generator.device).cpu()
            return {k: v[idx].to(device) for k, v in self.table.items()}
        return {}


def _doc(gen: FewStepStudent, sample_shape: Sequence[int], metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    recipe = gen.recipe or {}
    if not recipe.get("network"):
        raise ValueError("the few-step student has no network recipe ({'network': ..., 'wrap': ...}); "
                         "it cannot be rebuilt from a file")
    return {"format": FORMAT, "network": recipe["network"], "denoiser": gen.spec(),
            "sample_shape": [int(s) for s in sample_shape], "metadata": dict(metadata or {})}


def save_fewstep(
    gen: FewStepStudent, path: str | Path, sample_shape: Sequence[int], metadata: Mapping[str, Any] | None = None,
    half: bool = False,
) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (the bare network; float16 with ``half``, e.g. for the zoo, else as trained)
    and ``<path>.json``; returns the paths."""
    from safetensors.torch import save_file

    from fastgen.distill.student import bare_network

    doc = _doc(gen, sample_shape, metadata)
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    base.parent.mkdir(parents=True, exist_ok=True)
    weights, meta = base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in bare_network(gen).state_dict().items()}
    save_file(state, str(weights))
    meta.write_text(json.dumps(doc, indent=2) + "\n")
    return weights, meta


def export_fewstep(
    gen: FewStepStudent, name: str, sample_shape: Sequence[int], card: str = "",
    extra: Mapping[str, Any] | None = None, weights_dir: str | Path | None = None,
) -> Path:
    """Write the student into the zoo as ``name`` (float16 weights, JSON, card); returns the weights path."""
    from fastgen.distill.student import bare_network
    from fastgen.models.zoo import export_model

    doc = _doc(gen, sample_shape, extra)
    rest = {"format": FORMAT, "sample_shape": doc["sample_shape"], **dict(extra or {})}
    return export_model(bare_network(gen), name, doc["network"], doc["denoiser"], card=card, extra=rest,
                        weights_dir=weights_dir)
