"""Trainer health: NaN gradients, explosions (exit code 1), invalid optimizer settings, stale temporaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fastgen.io.checkpoint import latest_checkpoint, read_checkpoint, tensors_finite
from fastgen.train import Trainer, TrainingDiverged
from fastgen.train.config import config_from_dict
from fastgen.train.method import build_method


def tiny_cfg(tmp_path: Path, **over) -> dict:
    cfg = {
        "name": "tiny", "output_dir": str(tmp_path / "run"), "seed": 3, "steps": 6, "batch_size": 16,
        "log_every": 1, "checkpoint_every": 2, "progress": False,
        "data": {"name": "mixture", "mixture": "ring", "num_samples": 40},
        "network": {"kind": "mlp", "in_dim": 2, "width": 16, "depth": 1, "num_classes": 8},
        "method": {"name": "edm", "label_dropout": 0.2},
        "optim": {"lr": 0.01, "warmup_steps": 3, "grad_clip": 0.5},
        "ema": {"decay": 0.9},
    }
    cfg.update(over)
    return cfg


def nan_grad_at(method, bad_step):
    """Patch ``method.step`` so its loss stays finite while its gradient is NaN at ``bad_step``."""
    inner = method.step

    def step(batch, step, generator):
        losses = dict(inner(batch, step, generator))
        if step == bad_step:
            p = next(method.net.parameters())
            # adds 0 to the loss, but d/dp sqrt(p^2 - p^2) = NaN
            losses["main"] = losses["main"] + torch.sqrt((p * p - p * p).sum())
        return losses

    method.step = step
    return method


def _weights(tr):
    return {k: v.clone() for k, v in tr.state_tensors().items()}


def test_nan_gradient_stops_the_step_with_step_loss_and_sigma(tmp_path):
    cfg = config_from_dict(tiny_cfg(tmp_path))
    tr = Trainer(cfg, method=nan_grad_at(build_method(cfg), bad_step=3))
    before = {}

    def snap(t, logs):
        before.update(_weights(t))

    with pytest.raises(TrainingDiverged) as info:
        tr.train(callback=snap)
    msg = str(info.value)
    assert "gradient of loss 'main' is non-finite" in msg and "at step 3" in msg
    assert "sigma in [" in msg and "step_00000002" in msg
    assert info.value.step == 3 and tr.step == 3
    for k, v in _weights(tr).items():  # the bad step changed nothing
        assert torch.equal(v, before[k]), k
    tensors, _ = read_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert tensors_finite(tensors) == []


def test_non_finite_state_is_never_written_as_a_checkpoint(tmp_path):
    tr = Trainer(config_from_dict(tiny_cfg(tmp_path, steps=2)))
    tr.train()
    good = latest_checkpoint(tmp_path / "run" / "checkpoints")
    with torch.no_grad():
        next(tr.networks["net"].parameters()).view(-1)[0] = float("nan")
    tr.step = 4
    with pytest.raises(TrainingDiverged, match="non-finite"):
        tr.save_checkpoint()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == good
    assert not (tmp_path / "run" / "checkpoints" / "step_00000004").exists()


@pytest.mark.parametrize(
    "optim, match",
    [
        ({"grad_clip": -1.0}, "grad_clip must be a finite number > 0"),
        ({"grad_clip": float("nan")}, "grad_clip must be a finite number > 0"),
        ({"lr": float("inf")}, "lr must be a finite number > 0"),
        ({"groups": {"main": {"lr": -1e-3}}}, "optimizer 'main'.*lr must be"),
        ({"weight_decay": -0.1}, "weight_decay must be"),
        ({"betas": [0.9, 1.0]}, "betas must be"),
        ({"explode_bound": 0.0}, "explode_bound must be"),
    ],
)
def test_invalid_optimizer_settings_are_refused_at_start(tmp_path, optim, match):
    with pytest.raises(ValueError, match=match):
        Trainer(config_from_dict(tiny_cfg(tmp_path, optim={"lr": 0.01, **optim})))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _cli_train(tmp_path, cfg, *sets):
    from fastgen.cli import main

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return main(["train", str(p), "--no-progress", *[a for s in sets for a in ("--set", s)]])


def test_exploding_run_exits_1_and_says_so(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, steps=8, optim={"lr": 1e10, "grad_clip": None})
    assert _cli_train(tmp_path, cfg) == 1
    err = capsys.readouterr().err
    assert "exploded" in err or "non-finite" in err
    assert "trained" not in capsys.readouterr().out
    # a finite loss beyond a small bound trips the bound itself
    cfg2 = tiny_cfg(tmp_path / "b", steps=3, optim={"lr": 0.01, "explode_bound": 1e-3})
    assert _cli_train(tmp_path, cfg2) == 1
    err = capsys.readouterr().err
    assert "the run exploded: |loss 'main'|" in err and "optim.explode_bound 0.001" in err and "at step 0" in err
    # negative clip through the CLI: a usage error (exit 2), not a run
    assert _cli_train(tmp_path, tiny_cfg(tmp_path / "c"), "optim.grad_clip=-1") == 2
    assert "grad_clip must be" in capsys.readouterr().err


def test_stale_temporary_checkpoint_folders_are_removed_on_start(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=2)
    Trainer(config_from_dict(cfg)).train()
    root = tmp_path / "run" / "checkpoints"
    stale = [root / ".step_00000004.tmp-12345", root / ".step_00000002.old-999"]
    for d in stale:
        d.mkdir()
        (d / "tensors.safetensors").write_bytes(b"x" * 1000)
    (root / ".latest.tmp-77").write_text("step_00000004\n")
    keep = root / "notes"  # anything that is not a checkpoint temporary stays
    keep.mkdir()
    Trainer(config_from_dict({**cfg, "steps": 4})).train()
    assert not any(d.exists() for d in stale) and not (root / ".latest.tmp-77").exists()
    assert keep.is_dir()
    assert latest_checkpoint(root).name == "step_00000004"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
