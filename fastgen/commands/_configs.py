"""Run configs by name or path for ``fastgen train`` / ``fastgen distill``.

The YAML configs ship inside the package (``fastgen/configs/train/*.yaml``, ``fastgen/configs/distill/*.yaml``)
and are addressed by name: ``fastgen distill diffusers-vp``, ``fastgen train digits-edm``. A path to an
existing file is used as given. ``--set`` takes one or more ``KEY=VALUE`` per flag
(``--set steps=2 batch_size=8 --set seed=1``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def config_names(group: str) -> list[str]:
    """The names of the shipped configs of ``group`` (``train`` or ``distill``)."""
    return sorted(p.stem for p in (CONFIGS_DIR / group).glob("*.yaml"))


def resolve_config(config: str, group: str) -> Path:
    """An existing YAML file, or the shipped config ``group/NAME.yaml``; ``FileNotFoundError`` naming both."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = CONFIGS_DIR / group / f"{config}.yaml"
    if "/" not in config and shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"config {config!r} is neither a YAML file nor a shipped {group} config; shipped: "
        f"{', '.join(config_names(group))}"
    )


def add_config_arguments(p: argparse.ArgumentParser, group: str, example: str) -> None:
    """The positional ``config`` (name or path) and ``--set KEY=VALUE [KEY=VALUE ...]`` (repeatable)."""
    p.add_argument("config", help=f"a shipped {group} config by name ({', '.join(config_names(group))}) "
                                  f"or a YAML path, e.g. {example}")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values (dotted keys, YAML values), e.g. --set steps=2000 optim.lr=3e-4")
