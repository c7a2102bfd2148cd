"""Training run configuration: YAML files that map 1:1 to dataclasses.

A YAML file has the fields of :class:`TrainConfig`; the nested sections ``data`` (a data set name of
:mod:`fastgen.data.registry` and its options), ``optim`` and ``ema`` are dataclasses too, while ``network``
(``kind``, a network of :mod:`fastgen.models.registry`, plus its kwargs) and ``method`` (``name``, a method
of :mod:`fastgen.train.method`, plus its kwargs) are free dicts validated by whoever consumes them.
Unknown keys in the dataclass sections raise ``ValueError`` naming the key and the accepted ones.

Overrides use dotted keys with YAML-parsed values: ``--set steps=2000 --set optim.lr=3e-4
--set method.label_dropout=0.2``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastgen.data.registry import check_options as check_data_options
from fastgen.train.accel import FROZEN_SHARDING, PRECISIONS

__all__ = [
    "DataConfig",
    "OptimConfig",
    "EMAConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "save_config",
]


@dataclass
class DataConfig:
    """Where batches come from: a data set of :mod:`fastgen.data.registry` by ``name`` and its ``options``
    (``digits``: ``split``, ``flatten``; ``mixture``: ``mixture``, ``mixture_options``, ``num_samples``,
    ``seed``; ``none``: ``num_samples``). In YAML the options sit next to the name
    (``data: {name: digits, split: train}``) or under ``options``."""

    name: str = "digits"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW settings, shared by every optimizer unless overridden per name in ``groups``
    (e.g. ``groups: {critic: {lr: 1e-4}}``). The learning rate rises linearly over ``warmup_steps``,
    and, when ``decay_start``/``decay_end`` are set, falls linearly from ``lr`` at ``decay_start`` to
    ``lr * final_lr_ratio`` at ``decay_end``; ``grad_clip`` is a max global grad norm per optimizer
    (``null`` disables)."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    decay_start: int | None = None  # linear lr decay from this step ...
    decay_end: int | None = None  # ... to lr * final_lr_ratio at this step (constant afterwards)
    final_lr_ratio: float = 0.1
    explode_bound: float | None = 1e8  # |loss| or pre-clip grad norm beyond this fails the run (null: off)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EMAConfig:
    """EMA of the method's ``ema_networks()``. With ``warmup`` the decay at update n is
    ``min(decay, (1 + n) / (10 + n))``. ``every``: update every k optimizer steps."""

    decay: float = 0.999
    warmup: bool = True
    every: int = 1


@dataclass
class TrainConfig:
    """One training run.

    ``batch_size`` is the *global* batch per optimizer step. It is split into ``micro_batches`` equal
    shards (default: one per process); each process runs ``micro_batches / num_processes`` of them with
    gradient accumulation. Every shard's randomness comes from a generator seeded by
    ``(seed, step, shard)``, so the loss curve depends only on the config, not on how many processes run it.
    """

    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 256
    micro_batches: int | None = None
    mixed_precision: str = "no"  # no | fp16 (loss scaling) | bf16 (accelerate's names)
    gradient_checkpointing: bool = False  # recompute activations in backward (Diffusers models, fastgen nets)
    frozen_sharding: str = "replicate"  # frozen networks (teachers) under FSDP: replicate | shard
    cpu: bool = False  # force CPU even where a GPU exists
    num_threads: int | None = None  # torch.set_num_threads per process (None: leave as is)
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest checkpoint in output_dir if any) | none | <checkpoint dir>
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    network: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp"})
    method: dict[str, Any] = field(default_factory=lambda: {"name": "edm"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("micro_batches", self.micro_batches is None or self.micro_batches >= 1, ">= 1 or null"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("mixed_precision", self.mixed_precision in PRECISIONS, "'no', 'fp16' or 'bf16'"),
            ("frozen_sharding", self.frozen_sharding in FROZEN_SHARDING, "'replicate' or 'shard'"),
            ("ema.decay", 0 <= self.ema.decay < 1, "in [0, 1)"),
            ("ema.every", self.ema.every >= 1, ">= 1"),
            ("optim.lr", self.optim.lr > 0, "> 0"),
            ("optim.warmup_steps", self.optim.warmup_steps >= 0, ">= 0"),
            ("optim.decay_end", (self.optim.decay_start is None) == (self.optim.decay_end is None) and (
                self.optim.decay_start is None or self.optim.decay_end > self.optim.decay_start >= 0),
             "set together with optim.decay_start, and > decay_start >= 0"),
            ("optim.final_lr_ratio", self.optim.final_lr_ratio >= 0, ">= 0"),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"config: {name} must be {accepted}")
        check_data_options(self.data.name, self.data.options)
        if "kind" not in self.network:
            raise ValueError("config: network must have a 'kind' (e.g. 'mlp' or 'unet')")
        if "name" not in self.method:
            raise ValueError("config: method must have a 'name' (e.g. 'edm' or 'flow')")


def _hint_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_hint_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _data_section(data: dict[str, Any]) -> dict[str, Any]:
    """``{name, **options}`` (the YAML form) -> ``{name, options}``."""
    options = dict(data.get("options") or {})
    options.update({k: v for k, v in data.items() if k not in ("name", "options")})
    return {"name": data.get("name", DataConfig.name), "options": options}


def check_fields(cls: type, options: Any, what: str) -> None:
    """Refuse keys of ``options`` that are not fields of the dataclass ``cls``: ``ValueError`` naming them and
    the accepted ones (``what`` names the section, e.g. ``"sfd method option(s)"``)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; accepted: {names}")


# String fields whose accepted values include accelerate's "no", which YAML 1.1 reads as the boolean False.
_YAML_NO_KEYS = frozenset({"mixed_precision"})


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config: {where or 'top level'} must be a mapping, got {type(data).__name__}")
    if cls is DataConfig:
        data = _data_section(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"config: unknown key(s) {[prefix + k for k in unknown]}; accepted in "
            f"{where or 'the top level'}: {names}"
        )
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        hint = hints[k]
        key = f"{where}.{k}" if where else k
        if dataclasses.is_dataclass(hint):
            kwargs[k] = _build(hint, v or {}, key)
            continue
        floaty = hint is float or float in typing.get_args(hint)
        if floaty and isinstance(v, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if hint is str and v is False and k in _YAML_NO_KEYS:  # YAML 1.1 reads `mixed_precision: no` as False
            v = "no"
        if not _hint_ok(v, hint):
            raise ValueError(f"config: {key} must be of type {hint}, got {v!r}")
        if floaty and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        kwargs[k] = v
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested dict, rejecting unknown keys by name."""
    return _build(TrainConfig, data, "")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The nested plain-dict form (what :func:`save_config` writes)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"--set key must be a dotted name like optim.lr, got {key!r}")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML run config and apply ``--set`` style overrides."""
    from fastgen.io.files import read_yaml

    data = read_yaml(path, "config")  # names the file: missing, binary, empty, syntax, top level not a mapping
    return config_from_dict(apply_overrides(data, list(overrides)))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML (round-trips through :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
