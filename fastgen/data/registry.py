"""Training data sets by name: ``build_dataset(name, **options) -> {key: tensor}`` (equal-length rows).

A training config's ``data: {name: NAME, **options}`` names an entry of this registry; nothing read from
a file is imported by module path, and an unknown name is a ``ValueError`` listing the registered ones.
User code adds data sets from Python::

    from fastgen.data.registry import register_dataset
    register_dataset("my-points", lambda n=1024, seed=0: {"x": make_points(n, seed)})

Built-in data sets:

- ``digits(split="train", flatten=False)``: scikit-learn's 8x8 digits, ``{"x": (N, 1, 8, 8) or (N, 64)
  float32 in [-1, 1], "label": (N,) int64}``; ``split`` is ``train | test | all``.
- ``mixture(mixture="ring", mixture_options={}, num_samples=65536, seed=0)``: ``num_samples`` points
  pre-drawn with ``seed`` from a :mod:`fastgen.data.toy` mixture (``ring | grid | random``, built with
  ``mixture_options``); ``{"x": (N, d), "label": (N,) component indices}``.
- ``none(num_samples=65536)``: for methods that draw their own inputs; ``{"index": (N,) int64}``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["register_dataset", "build_dataset", "dataset_names", "check_options"]

Dataset = dict[str, torch.Tensor]
_DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str, builder: Callable[..., Dataset]) -> None:
    """Register ``builder(**options) -> {key: tensor}`` as data set ``name`` (replaces one of that name)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"data set name must be a non-empty string without ':', got {name!r}")
    _DATASETS[name] = builder


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def _builder(name: Any) -> Callable[..., Dataset]:
    if not isinstance(name, str) or name not in _DATASETS:
        raise ValueError(f"data.name must be one of {dataset_names()}, got {name!r}")
    return _DATASETS[name]


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """``ValueError`` for an unknown data set ``name`` or options its builder does not accept."""
    params = inspect.signature(_builder(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in options if k not in params]
    if unknown:
        raise ValueError(
            f"config: unknown key(s) {['data.' + k for k in unknown]}; accepted in data ({name}): "
            f"{['name', *params]}"
        )


def build_dataset(name: str, **options: Any) -> Dataset:
    """The in-memory data set ``name`` built with ``options``."""
    check_options(name, options)
    return _builder(name)(**options)


def _digits(split: str = "train", flatten: bool = False) -> Dataset:
    from fastgen.data.digits import load_digits_split

    data = load_digits_split(split)
    x = data.images.reshape(len(data), -1) if flatten else data.images
    return {"x": x.float(), "label": data.labels.long()}


def _mixture(
    mixture: str = "ring", mixture_options: Mapping[str, Any] | None = None, num_samples: int = 65536, seed: int = 0
) -> Dataset:
    from fastgen.data import toy

    builders = {"ring": toy.ring_mixture, "grid": toy.grid_mixture, "random": toy.random_mixture}
    if mixture not in builders:
        raise ValueError(f"data.mixture must be one of {sorted(builders)}, got {mixture!r}")
    try:
        mix = builders[mixture](**dict(mixture_options or {}))
    except TypeError as err:
        raise ValueError(f"data.mixture_options do not fit {mixture!r}: {err}") from err
    x, labels = mix.sample(num_samples, generator=torch.Generator().manual_seed(seed))
    return {"x": x.float(), "label": labels.long()}


def _none(num_samples: int = 65536) -> Dataset:
    return {"index": torch.arange(num_samples)}


register_dataset("digits", _digits)
register_dataset("mixture", _mixture)
register_dataset("none", _none)
