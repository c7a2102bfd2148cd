"""The model zoo: embedded models loaded by name, no downloads.

A model ``NAME`` is three files in ``fastgen/models/weights/`` (or another folder passed as ``weights_dir``):

- ``NAME.safetensors``: the network's state dict (float16 or float32; loaded as float32 by default);
- ``NAME.json``: ``{"network": {"kind": NAME, **kwargs}, "denoiser": {"type": NAME, **kwargs},
  "sample_shape": [...]}``: registry names only (:mod:`fastgen.models.registry`: networks ``mlp``,
  ``unet``, ``diffusers``; wrappers ``edm``, ``flow``, ``raw``, ``diffusers``, ``shortcut``, ``student``,
  ``fewstep``: SFD / BOSS students).
  Nothing in the file is imported or called by module path. Extra top-level keys (training provenance,
  ``method``, FD reached, ...) are kept for the model card; ``method.name == "gft"`` marks a GFT model;
- ``NAME.md``: the model card (config, seed, steps, wall time, FD_digits reached).

``load(name)`` returns the denoiser in eval mode with gradients off; EDM-contract models are called as
``D(x, sigma, class_labels=labels_or_None)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastgen.models.registry import build_network, wrap

__all__ = [
    "WEIGHTS_DIR", "list_models", "load", "load_network", "build_model", "model_info", "model_card", "export_model",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def _dir(weights_dir: str | Path | None) -> Path:
    return Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def list_models(weights_dir: str | Path | None = None) -> list[str]:
    """Names with a ``.safetensors`` + ``.json`` pair whose JSON has a ``network`` section."""
    d = _dir(weights_dir)
    names = []
    for js in sorted(d.glob("*.json")):
        if not (d / f"{js.stem}.safetensors").is_file():
            continue
        try:
            if "network" in json.loads(js.read_text()):
                names.append(js.stem)
        except json.JSONDecodeError:
            continue
    return names


def model_info(name: str, weights_dir: str | Path | None = None) -> dict[str, Any]:
    """The parsed ``NAME.json``; ``ValueError`` naming the available models when ``name`` is unknown."""
    d = _dir(weights_dir)
    js, st = d / f"{name}.json", d / f"{name}.safetensors"
    if not (js.is_file() and st.is_file()):
        raise ValueError(f"unknown model {name!r}; available: {list_models(weights_dir)} (in {str(d)!r})")
    try:
        info = json.loads(js.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {str(js)!r} is not valid JSON: {err}") from err
    if "network" not in info or "kind" not in info["network"]:
        raise ValueError(f"model config {str(js)!r} needs a 'network' section with a 'kind'")
    return info


def model_card(name: str, weights_dir: str | Path | None = None) -> str:
    """The text of ``NAME.md`` ('' when there is none)."""
    p = _dir(weights_dir) / f"{name}.md"
    return p.read_text() if p.is_file() else ""


def _state(weights: str | Path | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(weights, dict):
        return weights
    try:
        return load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"cannot read weights {str(weights)!r}: {err}") from err


def build_network_from_info(
    info: dict[str, Any], weights: str | Path | dict[str, torch.Tensor], where: str,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The bare network of a model JSON (``"network": {"kind": NAME, **kwargs}``, a registry name) with
    ``weights`` (a safetensors path or a state dict), in eval mode without gradients."""
    net_kw = dict(info.get("network") or {})
    if "kind" not in net_kw:
        raise ValueError(f"{where}: 'network' needs a 'kind' (a registered network name)")
    net = build_network(net_kw.pop("kind"), **net_kw)
    state = _state(weights)
    try:
        net.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()})
    except RuntimeError as err:
        raise ValueError(f"weights for {where} do not fit the network: {err}") from err
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_model(
    info: dict[str, Any], weights: str | Path | dict[str, torch.Tensor], where: str = "model",
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Network + denoiser wrapper of a model JSON (``"denoiser": {"type": NAME, ...}``, a registry name;
    default ``edm``), in eval mode with gradients off. The one place a model JSON becomes a module."""
    import fastgen.models.fewstep  # noqa: F401  (registers the "fewstep" wrapper: SFD / BOSS students)
    import fastgen.models.onestep  # noqa: F401  (registers the "student" wrapper)
    import fastgen.models.shortcut  # noqa: F401  (registers the "shortcut" wrapper)

    net = build_network_from_info(info, weights, where, device, dtype)
    model = wrap(net, info.get("denoiser", {"type": "edm"}))
    return model.to(device=device).eval().requires_grad_(False)


def load_network(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    weights_dir: str | Path | None = None,
) -> nn.Module:
    """The bare network of model ``name`` with its weights (eval mode, no gradients)."""
    info = model_info(name, weights_dir)
    path = _dir(weights_dir) / f"{name}.safetensors"
    return build_network_from_info(info, path, f"{name}.json", device, dtype)


def load(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    weights_dir: str | Path | None = None,
) -> nn.Module:
    """A ready model by name, e.g. ``load("digits-edm")``: an EDM-contract denoiser
    ``D(x (B,1,8,8), sigma, class_labels=(B,) int64 or None) -> x0_hat`` in eval mode, gradients off
    (a :class:`~fastgen.models.onestep.OneStepStudent` for students). For everything a caller needs
    besides the module (shape, sigma range, conditioning, identity) use :func:`fastgen.models.load_model`."""
    info = model_info(name, weights_dir)
    return build_model(info, _dir(weights_dir) / f"{name}.safetensors", f"{name}.json", device, dtype)


def export_model(
    net: nn.Module,
    name: str,
    network: dict[str, Any],
    denoiser: dict[str, Any],
    card: str = "",
    extra: dict[str, Any] | None = None,
    weights_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``NAME.safetensors`` (``net``'s state dict in ``dtype``), ``NAME.json`` and ``NAME.md``."""
    d = _dir(weights_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in net.state_dict().items()
    }
    save_file(state, str(d / f"{name}.safetensors"))
    info = {"network": network, "denoiser": denoiser, **(extra or {})}
    (d / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n")
    if card:
        (d / f"{name}.md").write_text(card)
    return d / f"{name}.safetensors"


def ema_state_from_checkpoint(ckpt_dir: str | Path, network: str = "net") -> dict[str, torch.Tensor]:
    """The EMA weights of ``network`` from a trainer checkpoint directory (keys of the bare network)."""
    from fastgen.io.checkpoint import read_checkpoint

    tensors, _ = read_checkpoint(ckpt_dir)
    prefix = f"ema/{network}.module."
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"checkpoint {str(ckpt_dir)!r} holds no EMA of network {network!r}")
    return out


def latest_checkpoint_of(root: str | Path) -> Path | None:
    """The checkpoint directory ``root/latest`` names (None when there is none yet)."""
    from fastgen.io.checkpoint import latest_checkpoint

    return latest_checkpoint(root)
