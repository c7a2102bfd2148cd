"""Registries of networks and denoiser wrappers, by name.

A model JSON (``NAME.json`` of the zoo, a student's ``.json``) and a training config name entries of these
registries only: ``"network": {"kind": NAME, **kwargs}`` and ``"denoiser": {"type": NAME, **kwargs}``.
Nothing read from a file is imported or called by module path; an unknown name is a ``ValueError`` that
lists the registered names. User code extends them from Python::

    from fastgen.models.registry import register_network, register_wrapper
    register_network("my-net", MyNet)                       # MyNet(**kwargs) -> nn.Module
    register_wrapper("my-den", lambda net, **kw: MyDen(net, **kw))

- ``build_network(kind, **kwargs)``: ``builder(**kwargs)``; keyword arguments the builder does not accept
  raise ``ValueError`` naming them and the accepted ones.
- ``wrap(net, spec)``: ``spec = {"type": NAME, **kwargs}`` (or None: the bare net) ->
  ``factory(net, **kwargs)``.

Built-in networks: ``mlp``, ``unet`` (:mod:`fastgen.models.nets`), ``diffusers`` (a Diffusers model class
by name, from its config). Built-in wrappers: ``edm``, ``flow``, ``raw``, ``diffusers`` (here), ``shortcut``
(:mod:`fastgen.models.shortcut`), ``student`` (:mod:`fastgen.models.onestep`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = [
    "register_network",
    "register_wrapper",
    "build_network",
    "wrap",
    "network_names",
    "wrapper_names",
    "lookup",
]

_NETWORKS: dict[str, Callable[..., nn.Module]] = {}
_WRAPPERS: dict[str, Callable[..., nn.Module]] = {}


def lookup(table: Mapping[str, Any], name: Any, what: str) -> Any:
    """``table[name]``, or ``ValueError`` naming ``what`` and the registered names (no import ever)."""
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{what} must be one of {sorted(table)} (registered names), got {name!r}")
    return table[name]


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"{what} name must be a non-empty string without ':', got {name!r}")


def register_network(name: str, builder: Callable[..., nn.Module]) -> None:
    """Register ``builder(**kwargs) -> nn.Module`` as network kind ``name`` (replaces one of that name)."""
    _check_name(name, "network")
    _NETWORKS[name] = builder


def register_wrapper(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``factory(net, **kwargs) -> denoiser`` as denoiser type ``name``."""
    _check_name(name, "denoiser wrapper")
    _WRAPPERS[name] = factory


def network_names() -> list[str]:
    return sorted(_NETWORKS)


def wrapper_names() -> list[str]:
    return sorted(_WRAPPERS)


def _accepted(fn: Callable[..., Any], skip: int) -> list[str] | None:
    """Keyword names ``fn`` accepts after its first ``skip`` parameters; None when it takes ``**kw``."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(fn):
        params = params[1:]  # self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params[skip:]]


def build_network(kind: str, **kwargs: Any) -> nn.Module:
    """The network of registered kind ``kind`` built with ``kwargs``."""
    builder = lookup(_NETWORKS, kind, "network kind")
    accepted = _accepted(builder, 0)
    unknown = sorted(set(kwargs) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(f"unknown {kind} network option(s) {unknown}; accepted: {accepted}")
    return builder(**kwargs)


def wrap(net: nn.Module, spec: Mapping[str, Any] | None) -> nn.Module:
    """Apply a denoiser wrapper spec ``{"type": NAME, **kwargs}`` (None: ``net`` itself)."""
    if spec is None:
        return net
    if not isinstance(spec, Mapping):
        raise ValueError(f"denoiser spec must be a mapping with a 'type', got {type(spec).__name__}")
    kw = dict(spec)
    kind = kw.pop("type", None)
    factory = lookup(_WRAPPERS, kind, "denoiser type")
    accepted = _accepted(factory, 1)
    unknown = sorted(set(kw) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(f"unknown {kind} denoiser option(s) {unknown}; accepted: {accepted}")
    return factory(net, **kw)


def _diffusers_model(model_class: str, config: Mapping[str, Any]) -> nn.Module:
    """A Diffusers model of class ``model_class`` (a model class exported by ``diffusers``) from its config."""
    import diffusers

    cls = getattr(diffusers, model_class, None) if isinstance(model_class, str) else None
    if cls is None or not (inspect.isclass(cls) and issubclass(cls, nn.Module)) or not hasattr(cls, "from_config"):
        raise ValueError(f"model_class {model_class!r} is not a Diffusers model class")
    return cls.from_config(dict(config))


def _edm(net: nn.Module, **kw: Any) -> nn.Module:
    from fastgen.core.denoiser import EDMDenoiser

    return EDMDenoiser(net, **{k: float(v) for k, v in kw.items()})


def _flow(net: nn.Module) -> nn.Module:
    from fastgen.core.denoiser import RectifiedFlowDenoiser

    return RectifiedFlowDenoiser(net)


def _raw(net: nn.Module) -> nn.Module:
    return net


def _diffusers(net: nn.Module, scheduler_config: Mapping[str, Any], prediction_type: str | None = None) -> nn.Module:
    from fastgen.core.denoiser import from_diffusers

    return from_diffusers(net, dict(scheduler_config), prediction_type=prediction_type)


register_network("diffusers", _diffusers_model)
register_wrapper("edm", _edm)
register_wrapper("flow", _flow)
register_wrapper("raw", _raw)
register_wrapper("diffusers", _diffusers)

# The built-in wrappers defined next to their networks register on import (after the registry exists).
from fastgen.models import onestep, shortcut  # noqa: E402,F401,I001
