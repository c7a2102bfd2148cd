"""Registries, not import strings: names read from files (YAML configs, model JSON, student JSON) are
registry keys only. A module path such as ``os:system`` or ``some_module:function`` is refused with a
``ValueError`` listing the registered names, before anything is imported or called."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from fastgen.cli import main as cli_main
from fastgen.data.registry import build_dataset, dataset_names, register_dataset
from fastgen.distill import divergences
from fastgen.distill.student import load_student
from fastgen.models import zoo
from fastgen.models.nets import ResidualMLP
from fastgen.models.registry import build_network, network_names, register_network, register_wrapper, wrap
from fastgen.train.config import config_from_dict
from fastgen.train.method import build_method, method_names, register_method

EVIL = "fastgen_evil_marker"


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """An importable module that creates ``marker`` when imported and when its ``run`` is called;
    ``os.system`` is replaced by a recorder. Yields ``(marker, os_system_calls)``."""
    marker = tmp_path / "marker"
    (tmp_path / f"{EVIL}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        f"def run(*a, **k):\n    Path({str(marker)!r}).write_text('called')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    calls: list = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    yield marker, calls
    assert not marker.exists(), "a name read from a file was imported or called"
    assert EVIL not in sys.modules
    assert calls == []


BAD_NAMES = ["os:system", f"{EVIL}:run", EVIL, "fastgen.train.edm:from_config"]


def _cfg(tmp_path: Path, **over) -> dict:
    cfg = {
        "name": "sec",
        "output_dir": str(tmp_path / "run"),
        "steps": 1,
        "batch_size": 4,
        "progress": False,
        "data": {"name": "mixture", "num_samples": 8},
        "network": {"kind": "mlp", "in_dim": 2, "width": 8, "depth": 1},
        "method": {"name": "edm"},
    }
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("name", BAD_NAMES)
def test_config_method_module_path_refused(tmp_path, evil, name):
    cfg = config_from_dict(_cfg(tmp_path, method={"name": name}))
    with pytest.raises(ValueError, match=r"method.name must be one of \[.*'edm'.*'flow'"):
        build_method(cfg)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_config_data_and_network_module_path_refused(tmp_path, evil, name):
    with pytest.raises(ValueError, match=r"data.name must be one of \[.*'digits'"):
        config_from_dict(_cfg(tmp_path, data={"name": name}))
    with pytest.raises(ValueError, match=r"network kind must be one of \[.*'mlp'"):
        build_network(name, in_dim=2)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_divergence_module_path_refused(evil, name):
    with pytest.raises(ValueError, match="unknown divergence.*js"):
        divergences.get(name)


def _zoo_entry(d: Path, name: str, network: dict, denoiser: dict) -> None:
    net = ResidualMLP(in_dim=2, width=8, depth=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / f"{name}.safetensors"))
    (d / f"{name}.json").write_text(json.dumps({"network": network, "denoiser": denoiser}))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_model_json_module_path_refused(tmp_path, evil, name):
    good_net = {"kind": "mlp", "in_dim": 2, "width": 8, "depth": 1}
    _zoo_entry(tmp_path, "bad-den", good_net, {"type": name})
    with pytest.raises(ValueError, match=r"denoiser type must be one of \[.*'edm'.*'student'"):
        zoo.load("bad-den", weights_dir=tmp_path)
    _zoo_entry(tmp_path, "bad-net", {"kind": name}, {"type": "edm"})
    with pytest.raises(ValueError, match=r"network kind must be one of \[.*'unet'"):
        zoo.load("bad-net", weights_dir=tmp_path)
    # the inner wrapper of a student, and a student's network recipe
    _zoo_entry(tmp_path, "bad-inner", good_net, {"type": "student", "sigma": 1.0, "wrap": {"type": name}})
    with pytest.raises(ValueError, match="denoiser type must be one of"):
        zoo.load("bad-inner", weights_dir=tmp_path)
    (tmp_path / "s.json").write_text(json.dumps({"format": "fastgen-one-step-student", "network": {"kind": name}}))
    (tmp_path / "s.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="network kind must be one of"):
        load_student(tmp_path / "s")


@pytest.mark.parametrize("name", ["os:system", f"{EVIL}:run"])
def test_load_model_and_cli_sample_refuse_a_student_naming_a_module_path(tmp_path, evil, capsys, name):
    """An exported student folder handed over by someone else: ``load_model`` and ``fastgen sample``."""
    from fastgen.models import load_model

    d = tmp_path / "student"
    d.mkdir()
    net = ResidualMLP(in_dim=2, width=8, depth=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "student.safetensors"))
    doc = {"format": "fastgen-one-step-student", "network": {"kind": "mlp", "in_dim": 2, "width": 8, "depth": 1},
           "denoiser": {"type": name, "sigma": 80.0}, "sample_shape": [2]}
    (d / "student.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="denoiser type must be one of"):
        load_model(d)
    out = tmp_path / "out"
    assert cli_main(["sample", "--model", str(d), "--num", "2", "--out", str(out), "--no-progress"]) == 2
    assert "denoiser type must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["os:system", f"{EVIL}:run"])
def test_cli_train_refuses_module_path(tmp_path, evil, capsys, name):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, method={"name": name})))
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "method.name must be one of" in err and "'fdistill'" in err  # the CLI registered f-distill
    path.write_text(yaml.safe_dump(_cfg(tmp_path, data={"name": name})))
    assert cli_main(["train", str(path)]) == 2
    assert "data.name must be one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_registered_names_and_names_with_colon_refused():
    assert {"edm", "flow", "shortcut", "gft", "fdistill"} <= set(method_names())
    assert {"mlp", "unet", "diffusers", "toy_mlp"} <= set(network_names())
    assert {"digits", "mixture", "none"} <= set(dataset_names())
    for register in (register_method, register_network, register_wrapper, register_dataset):
        with pytest.raises(ValueError, match="without ':'"):
            register("os:system", lambda *a, **k: None)


def test_extension_from_python(tmp_path):
    """Each registry is extended from Python, and the new name then works from a config / model JSON."""
    register_dataset("sec-line", lambda n=6: {"x": torch.linspace(-1, 1, n).reshape(n, 1).repeat(1, 2)})
    assert build_dataset("sec-line", n=3)["x"].shape == (3, 2)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['data.m'\]"):
        config_from_dict(_cfg(tmp_path, data={"name": "sec-line", "m": 3}))
    cfg = config_from_dict(_cfg(tmp_path, data={"name": "sec-line", "n": 5}, method={"name": "sec-method"}))
    assert cfg.data.options == {"n": 5}
    sentinel = object()
    register_method("sec-method", lambda c: (sentinel, c.data.name))
    assert build_method(cfg) == (sentinel, "sec-line")

    register_network("sec-lin", lambda width=3: torch.nn.Linear(2, width))
    assert build_network("sec-lin", width=4).out_features == 4
    with pytest.raises(ValueError, match=r"unknown sec-lin network option\(s\) \['depth'\]"):
        build_network("sec-lin", depth=2)
    register_wrapper("sec-double", lambda net, k=2.0: torch.nn.Sequential(net, _Scale(k)))
    lin = torch.nn.Linear(2, 2)
    x = torch.randn(3, 2)
    assert torch.equal(wrap(lin, {"type": "sec-double", "k": 3.0})(x), lin(x) * 3.0)

    div = divergences.Divergence("sec-tv-ish", lambda r: (r - 1) ** 2 / 2, lambda r: r**2)
    divergences.register_divergence(div, aliases=("sec",))
    assert divergences.get("sec") is div and div.need_r
    assert not divergences.get("reverse_kl").need_r and not divergences.alpha(0.0).need_r
    assert divergences.get("js").need_r and divergences.alpha(0.5).need_r


class _Scale(torch.nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k
