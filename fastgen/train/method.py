"""The contract between a training *method* and the :class:`~fastgen.train.trainer.Trainer`.

A method owns its networks and computes named losses; the trainer owns optimizers, devices,
mixed precision, gradient accumulation, EMA, checkpoints and logging.

- ``networks()`` returns the trainable modules by name. Each name that appears in
  ``optimizer_groups()`` gets its own optimizer (``"main"`` for single-network methods).
- ``optimizer_groups()`` maps an optimizer name to the network names it updates, e.g.
  ``{"main": ["net"]}`` or, for f-distill, ``{"student": ["student"], "critic": ["fake_score", "disc"]}``.
- ``ema_networks()`` names the networks whose EMA the trainer keeps (``[]`` for none).
- ``frozen()`` returns modules the method uses but never trains (teachers); the trainer moves them
  to the device and keeps them out of checkpoints.
- ``step(batch, step, generator)`` returns an ordered mapping ``{optimizer_name: loss}`` of the
  scalar losses to minimise at this step. The trainer, for each item in order, zeroes all grads,
  backpropagates that loss and steps that optimizer only (so an alternating schedule such as
  "critic every step, student every k-th step" is expressed by which names the method returns).
  Extra scalars to log go in ``self.last_logs`` (a dict of floats) and are written to the metrics log.
- ``state_dict()/load_state_dict()`` hold non-network state (e.g. f-distill's ratio bins) that
  exact resume needs; tensors only (they are saved as safetensors).
- ``batch`` is what the data loader yields (a dict of tensors, e.g. ``{"x": images, "label": labels}``),
  already on the trainer's device. It is one *shard* of the global batch (``batch_size / micro_batches``
  rows); ``step`` is the 0-based optimizer step.
- ``generator`` is a CPU ``torch.Generator`` seeded from ``(seed, step, shard)``; draw with
  ``device=generator.device`` and move the result (``torch.randn(shape, generator=g,
  device=g.device).to(x.device)``). The global torch seed is set from the same triple before each call.
  Drawing all randomness this way is what makes resumed and multi-process runs exact.
- The trainer runs ``step`` under ``torch.autocast`` when ``mixed_precision`` is ``fp16`` or ``bf16``.
- During ``step`` the trainer points the method's references to its networks (attributes of the method, or
  children of modules it holds, such as ``EDMDenoiser.net``) at their ``accelerator.prepare``-d (DDP/FSDP)
  wrappers, and restores the plain modules afterwards; so a method just calls its networks. Each returned
  loss is backpropagated into its own optimizer's parameters only: gradients a loss would send into
  another optimizer's networks (e.g. a generator loss through the critic) are not computed.
- Registry: a config's ``method: {name: ...}`` names a method registered with :func:`register_method`
  (resolved by :func:`build_method`); nothing is imported by module path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn


class Method(Protocol):
    last_logs: dict[str, float]

    def networks(self) -> Mapping[str, nn.Module]: ...

    def optimizer_groups(self) -> Mapping[str, list[str]]: ...

    def ema_networks(self) -> list[str]: ...

    def frozen(self) -> Mapping[str, nn.Module]: ...

    def step(
        self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> Mapping[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------
# Method registry: how a YAML config's ``method: {name: ..., ...}`` becomes a Method.
# --------------------------------------------------------------------------------------------

#: Registered methods: name -> ``factory(cfg: TrainConfig) -> Method``. A factory builds its own networks
#: (typically with ``fastgen.models.registry.build_network(**cfg.network)``) from the method kwargs
#: ``method_kwargs(cfg)``. The built-in methods register themselves when their module is imported:
#: ``edm``, ``flow``, ``shortcut`` and ``gft`` by this package, ``fdistill`` by the distillation package.
_REGISTRY: dict[str, Callable[[Any], Method]] = {}


def register_method(name: str, factory: Callable[[Any], Method]) -> None:
    """Register ``factory(cfg) -> Method`` under ``name`` (replaces a method of that name)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"method name must be a non-empty string without ':', got {name!r}")
    _REGISTRY[name] = factory


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_kwargs(cfg: Any) -> dict[str, Any]:
    """The ``method`` section of a config without its ``name``: the method's keyword arguments."""
    return {k: v for k, v in cfg.method.items() if k != "name"}


def build_method(cfg: Any) -> Method:
    """Build the method a config names (a registered name; ``ValueError`` listing them otherwise)."""
    name = cfg.method["name"]
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"method.name must be one of {method_names()}, got {name!r} (a method defined outside this "
            "package is registered when its package is imported; the fastgen CLI imports all of them)"
        )
    return _REGISTRY[name](cfg)


def check_kwargs(fn: Any, kwargs: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming keys of ``kwargs`` that ``fn`` does not accept."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("self", "net")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; accepted: {accepted}")


class SingleNetworkMethod:
    """The protocol's bookkeeping for methods that train one network ``self.net``.

    One optimizer ``"main"`` over ``"net"``, an EMA of ``"net"``, no frozen modules and no extra
    state. Subclasses set ``self.net`` and ``self.last_logs`` and implement ``step``.
    """

    net: nn.Module

    def networks(self) -> Mapping[str, nn.Module]:
        return {"net": self.net}

    def optimizer_groups(self) -> Mapping[str, list[str]]:
        return {"main": ["net"]}

    def ema_networks(self) -> list[str]:
        return ["net"]

    def frozen(self) -> Mapping[str, nn.Module]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
