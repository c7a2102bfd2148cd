"""Trainer: exact resume, NaN stop, config errors, corrupt checkpoints, EMA, warm-up (2 processes: test_distributed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fastgen.io.checkpoint import latest_checkpoint, read_checkpoint
from fastgen.train import Trainer, TrainingDiverged
from fastgen.train.config import config_from_dict, load_config
from fastgen.train.ema import ema_decay, make_ema

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path: Path, **over) -> dict:
    cfg = {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
        "steps": 6,
        "batch_size": 16,
        "log_every": 1,
        "checkpoint_every": 2,
        "progress": False,
        "data": {"name": "mixture", "mixture": "ring", "num_samples": 40},
        "network": {"kind": "mlp", "in_dim": 2, "width": 16, "depth": 1, "num_classes": 8},
        "method": {"name": "edm", "label_dropout": 0.2},
        "optim": {"lr": 0.01, "warmup_steps": 3, "grad_clip": 0.5},
        "ema": {"decay": 0.9},
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tr.state_tensors().items()}


def test_resume_after_kill_is_exact(tmp_path):
    full = Trainer(config_from_dict(tiny_cfg(tmp_path / "a")))
    full.train()
    ref = weights(full)

    class Killed(Exception):
        pass

    def kill(tr, logs):
        if tr.step == 5:  # after the step-4 checkpoint, before the step-6 one
            raise Killed

    cfg = config_from_dict(tiny_cfg(tmp_path / "b"))
    with pytest.raises(Killed):
        Trainer(cfg).train(callback=kill)
    assert latest_checkpoint(tmp_path / "b" / "run" / "checkpoints").name == "step_00000004"
    resumed = Trainer(config_from_dict(tiny_cfg(tmp_path / "b")))
    resumed.train()
    assert resumed.step == 6
    out = weights(resumed)
    assert out.keys() == ref.keys()
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    # optimizer state too (exp_avg etc.)
    for name, opt in full.optimizers.items():
        a, b = opt.state_dict()["state"], resumed.optimizers[name].state_dict()["state"]
        for i in a:
            assert torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"])
    # the metrics log has each step exactly once after the resume
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # and its losses equal the uninterrupted run's
    def losses(run):
        return [json.loads(line)["loss/main"] for line in (tmp_path / run).read_text().splitlines()]

    assert losses("a/run/metrics.jsonl") == losses("b/run/metrics.jsonl")


class NaNAt:
    """A method wrapper whose loss becomes NaN at one step."""

    def __init__(self, inner, bad_step):
        self.inner, self.bad_step, self.last_logs = inner, bad_step, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, batch, step, generator):
        losses = dict(self.inner.step(batch, step, generator))
        if step == self.bad_step:
            losses["main"] = losses["main"] * float("nan")
        return losses


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    from fastgen.train.method import build_method

    cfg = config_from_dict(tiny_cfg(tmp_path))
    tr = Trainer(cfg, method=NaNAt(build_method(cfg), bad_step=3))
    before = None

    def snap(t, logs):
        nonlocal before
        before = weights(t)

    with pytest.raises(TrainingDiverged, match="at step 3") as info:
        tr.train(callback=snap)
    assert info.value.step == 3
    assert info.value.checkpoint.name == "step_00000002"
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000002"
    assert "step_00000002" in str(info.value)
    # the weights were not touched by the NaN step
    for k, v in weights(tr).items():
        assert torch.equal(v, before[k])


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['data.splitt'\]"):
        config_from_dict(tiny_cfg(tmp_path, data={"name": "digits", "splitt": "train"}))
    with pytest.raises(ValueError, match=r"\['stepz'\]"):
        config_from_dict({**tiny_cfg(tmp_path), "stepz": 3})
    with pytest.raises(ValueError, match="optim.lr must be of type"):
        config_from_dict(tiny_cfg(tmp_path, optim={"lr": "fast"}))
    with pytest.raises(ValueError, match="mixed_precision"):
        config_from_dict(tiny_cfg(tmp_path, mixed_precision="fp8"))
    with pytest.raises(FileNotFoundError, match="nope.yaml.*file not found"):
        load_config(tmp_path / "nope.yaml")
    # accelerate's "no", written bare in YAML (1.1 reads it as False), in a file and as an override
    yml = tmp_path / "c.yaml"
    yml.write_text(f"output_dir: {tmp_path / 'o'}\nmixed_precision: no\n")
    assert load_config(yml).mixed_precision == "no"
    assert load_config(yml, ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision must be of type"):  # True is no precision's name
        load_config(yml, ["mixed_precision=yes"])
    cfg = config_from_dict(tiny_cfg(tmp_path))
    with pytest.raises(ValueError, match=r"unknown mlp network option\(s\) \['widht'\]"):
        Trainer(config_from_dict(tiny_cfg(tmp_path, network={"kind": "mlp", "in_dim": 2, "widht": 3})))
    with pytest.raises(ValueError, match=r"unknown edm method option\(s\) \['p_meen'\]"):
        Trainer(config_from_dict(tiny_cfg(tmp_path, method={"name": "edm", "p_meen": 0.0})))
    with pytest.raises(ValueError, match="method.name must be one of"):
        Trainer(config_from_dict(tiny_cfg(tmp_path, method={"name": "nosuch"})))
    # missing / empty data
    with pytest.raises(ValueError, match="data.name must be"):
        config_from_dict(tiny_cfg(tmp_path, data={"name": "cifar"}))
    with pytest.raises(ValueError, match="dataset tensors must be non-empty"):
        Trainer(cfg, dataset={"x": torch.zeros(0, 2), "label": torch.zeros(0, dtype=torch.long)})
    with pytest.raises(ValueError, match="batch_size .* divisible by micro_batches"):
        Trainer(config_from_dict(tiny_cfg(tmp_path, batch_size=15, micro_batches=2)))


def test_yaml_and_overrides(tmp_path):
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_cfg(tmp_path)))
    cfg = load_config(p, ["steps=11", "optim.lr=3e-4", "method.label_dropout=0.5", "ema.warmup=false"])
    assert cfg.steps == 11 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.method["label_dropout"] == 0.5 and cfg.ema.warmup is False
    with pytest.raises(ValueError, match="key=value"):
        load_config(p, ["steps"])
    for name in ("digits-edm", "digits-flow", "mixture-edm", "mixture-flow"):
        load_config(REPO / "fastgen" / "configs" / "train" / f"{name}.yaml")  # the shipped configs parse


def test_corrupt_checkpoint_is_reported(tmp_path):
    cfg = config_from_dict(tiny_cfg(tmp_path, steps=2))
    Trainer(cfg).train()
    ck = latest_checkpoint(tmp_path / "run" / "checkpoints")
    read_checkpoint(ck)
    f = ck / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt checkpoint.*sha256"):
        Trainer(config_from_dict(tiny_cfg(tmp_path, steps=4))).train()
    (ck / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint.*not valid JSON"):
        read_checkpoint(ck)
    os.remove(ck / "state.json")
    with pytest.raises(ValueError, match="missing state.json"):
        read_checkpoint(ck)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nothing")


def test_ema_warmup_and_lr_warmup(tmp_path):
    net = torch.nn.Linear(2, 1)
    ema = make_ema(net, decay=0.9, warmup=True)
    w = [net.weight.detach().clone()]
    expect = w[0].clone()  # the first update copies
    ema.update_parameters(net)
    for n in range(1, 4):
        with torch.no_grad():
            net.weight.add_(1.0)
        d = min(0.9, (1 + n) / (10 + n))
        assert ema_decay(0.9, n) == pytest.approx(d)
        expect = d * expect + (1 - d) * net.weight.detach()
        ema.update_parameters(net)
        assert torch.allclose(ema.module.weight, expect, atol=1e-6)
    tr = Trainer(config_from_dict(tiny_cfg(tmp_path)))
    assert [tr.lr_at("main", s) for s in range(5)] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01, 0.01])
    tr = Trainer(config_from_dict(tiny_cfg(tmp_path, optim={"lr": 0.01, "decay_start": 4, "decay_end": 8,
                                                           "final_lr_ratio": 0.2})))
    assert [tr.lr_at("main", s) for s in (3, 4, 6, 8, 20)] == pytest.approx([0.01, 0.01, 0.006, 0.002, 0.002])
    with pytest.raises(ValueError, match="optim.decay_end"):
        config_from_dict(tiny_cfg(tmp_path, optim={"decay_start": 4}))


def test_bf16_autocast_and_flow_method(tmp_path):
    """bf16 mixed precision runs (loss close to the fp32 loss of the same step) and the flow method trains."""
    base = tiny_cfg(tmp_path / "a", steps=2, checkpoint_every=100)
    fp32 = Trainer(config_from_dict(base)).train()
    bf16 = Trainer(config_from_dict({**base, "output_dir": str(tmp_path / "b"), "mixed_precision": "bf16"})).train()
    assert bf16[1]["loss/main"] == pytest.approx(fp32[1]["loss/main"], rel=0.05)  # step 0: zero output layer
    assert bf16[1]["loss/main"] != fp32[1]["loss/main"]
    flow = tiny_cfg(tmp_path / "c", steps=40, checkpoint_every=100, method={"name": "flow"},
                    optim={"lr": 0.01, "warmup_steps": 0})
    rec = Trainer(config_from_dict(flow)).train()
    assert rec[-1]["loss/main"] < 0.8 * rec[0]["loss/main"]


def test_cli_train(tmp_path, capsys):
    import yaml

    from fastgen.cli import main

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_cfg(tmp_path, steps=2)))
    assert main(["train", str(p), "--no-progress", "--set", "steps=3"]) == 0
    assert "trained tiny to step 3" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000003"
    assert main(["train", str(p), "--set", "optim.lrr=1"]) == 2
    assert "unknown key(s) ['optim.lrr']" in capsys.readouterr().err


class TwoLosses:
    """Two optimizers whose losses share one forward pass (student/critic style)."""

    def __init__(self):
        torch.manual_seed(0)
        self.a, self.b, self.last_logs = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), {}

    def networks(self):
        return {"a": self.a, "b": self.b}

    def optimizer_groups(self):
        return {"critic": ["b"], "student": ["a"]}

    def ema_networks(self):
        return []

    def frozen(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def step(self, batch, step, generator):
        h = self.a(batch["x"])
        out = self.b(h).mean()
        self.last_logs = {"out": float(out.detach())}
        return {"critic": (out - 1) ** 2, "student": out**2}


def test_multi_optimizer_losses_step_only_their_networks(tmp_path):
    cfg = config_from_dict(tiny_cfg(tmp_path, steps=1, ema={"decay": 0.5},
                                    optim={"lr": 0.1, "grad_clip": None}))
    m = TwoLosses()
    a0, b0 = m.a.weight.detach().clone(), m.b.weight.detach().clone()
    tr = Trainer(cfg, method=m)
    x = tr.data["x"][_first_rows(cfg)]
    out = m.b(m.a(x)).mean()
    ga = torch.autograd.grad(out**2, m.a.weight, retain_graph=True)[0]
    gb = torch.autograd.grad((out - 1) ** 2, m.b.weight)[0]
    recs = tr.train()
    assert "out" in recs[0] and set(tr.optimizers) == {"critic", "student"}
    # first AdamW step moves each weight by -lr * sign(grad) (up to eps) using only its own loss
    assert torch.allclose(m.a.weight, a0 - 0.1 * ga.sign(), atol=1e-5)
    assert torch.allclose(m.b.weight, b0 - 0.1 * gb.sign(), atol=1e-5)


def _first_rows(cfg):
    from fastgen.train.batches import global_indices

    return global_indices(cfg.data.options["num_samples"], cfg.seed, 0, cfg.batch_size)
