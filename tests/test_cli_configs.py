"""Shipped configs by name and ``--set a=1 b=2`` (issue 14 item 5)."""

from __future__ import annotations

import json

import pytest

from fastgen.cli import main
from fastgen.commands._configs import CONFIGS_DIR, config_names, resolve_config


def test_configs_ship_inside_the_package_and_parse_by_name():
    import fastgen.distill  # noqa: F401  (registers the distill methods and the t2i data set, as `fastgen distill`)
    from fastgen.train import load_config

    assert CONFIGS_DIR.parent.name == "fastgen"
    assert {"digits-edm", "mixture-edm"} <= set(config_names("train"))
    assert {"diffusers-vp", "digits-js", "ring-js"} <= set(config_names("distill"))
    for group in ("train", "distill"):
        for name in config_names(group):
            assert resolve_config(name, group) == CONFIGS_DIR / group / f"{name}.yaml"
            assert load_config(resolve_config(name, group)).name  # every shipped config parses
    with pytest.raises(FileNotFoundError, match="shipped: .*digits-js"):
        resolve_config("nope", "distill")


def test_train_by_name_with_several_overrides_per_set(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "mixture-edm", "--set", "steps=3", "batch_size=16", f"output_dir={run}",
                 "data.num_samples=64", "--set", "checkpoint_every=3", "--no-progress"]) == 0
    assert "to step 3" in capsys.readouterr().out
    saved = (run / "config.yaml").read_text()
    assert "batch_size: 16" in saved and "checkpoint_every: 3" in saved
    assert (run / "checkpoints" / "latest").is_file()
    assert main(["distill", "no-such-config", "--no-progress"]) == 2
    assert "shipped: diffusers-vp" in capsys.readouterr().err


def test_pyproject_names_a_free_distribution_and_packages_the_configs():
    from pathlib import Path

    import tomllib

    doc = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert doc["project"]["name"] == "fastgen-diffusion"
    assert doc["project"]["scripts"]["fastgen"] == "fastgen.cli:main"
    assert "configs/*/*.yaml" in doc["tool"]["setuptools"]["package-data"]["fastgen"]
    assert "xformers" not in doc["project"]["optional-dependencies"]  # no code uses it
    assert json.dumps(doc["project"]["optional-dependencies"]["pipelines"]).count("transformers") == 1
