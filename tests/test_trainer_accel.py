"""Trainer on accelerate: fp16 loss scaling (overflow skips, exact resume of the scale), gradient
checkpointing (same gradients), network binding into the method, and start-up refusals by name."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastgen.io.checkpoint import latest_checkpoint, read_checkpoint
from fastgen.train import Trainer, TrainingDiverged
from fastgen.train.accel import NetworkSlots, enable_gradient_checkpointing
from fastgen.train.config import config_from_dict
from fastgen.train.method import build_method


def tiny_cfg(tmp_path: Path, **over) -> dict:
    cfg = {
        "name": "tiny", "output_dir": str(tmp_path / "run"), "seed": 3, "steps": 6, "batch_size": 16,
        "log_every": 1, "checkpoint_every": 100, "progress": False,
        "data": {"name": "mixture", "mixture": "ring", "num_samples": 40},
        "network": {"kind": "mlp", "in_dim": 2, "width": 16, "depth": 2, "num_classes": 8},
        "method": {"name": "edm", "label_dropout": 0.2},
        "optim": {"lr": 0.01, "warmup_steps": 3, "grad_clip": 0.5},
        "ema": {"decay": 0.9},
    }
    cfg.update(over)
    return cfg


def nan_grads_at(method, steps):
    """At the given steps the loss stays as it is while one parameter's gradient becomes NaN (a one-shot
    gradient hook)."""
    inner = method.step

    def step(batch, step, generator):
        if step in steps:
            p = next(method.net.parameters())

            def to_nan(g):
                handle.remove()
                return torch.full_like(g, float("nan"))

            handle = p.register_hook(to_nan)
        return inner(batch, step, generator)

    method.step = step
    return method


def _acc(init_scale: float = 2.0**8):
    """An accelerator whose loss scaler starts at ``init_scale`` (accelerate's GradScalerKwargs): low enough
    that this tiny net never overflows by itself, so only the injected NaN gradients skip steps (CPU fp16
    kernels decide borderline overflows differently from one call to the next)."""
    from accelerate import Accelerator
    from accelerate.utils import GradScalerKwargs

    return Accelerator(cpu=True, kwargs_handlers=[GradScalerKwargs(init_scale=init_scale)])


def _net(tr):
    return {k: v.clone() for k, v in tr.networks["net"].state_dict().items()}


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    cfg = config_from_dict(tiny_cfg(tmp_path, steps=7, mixed_precision="fp16"))
    tr = Trainer(cfg, method=nan_grads_at(build_method(cfg), {2, 5}), accelerator=_acc())
    snaps, logs = [], []
    tr.train(callback=lambda t, lg: (snaps.append(_net(t)), logs.append(lg)))
    assert [lg["skipped"] for lg in logs] == [0, 0, 1, 0, 0, 1, 0]
    assert [lg["loss_scale"] for lg in logs] == [256, 256, 128, 128, 128, 64, 64]
    for k in snaps[4]:  # the overflowing step left every weight as it was
        assert torch.equal(snaps[5][k], snaps[4][k]), k
    for i in range(1, 7):  # and every step that was not skipped moved them
        moved = any(not torch.equal(snaps[i][k], snaps[i - 1][k]) for k in snaps[i])
        assert moved == (logs[i]["skipped"] == 0.0), i
    assert all(math.isfinite(lg["loss/main"]) for lg in logs)


def test_fp16_gradients_nonfinite_at_every_scale_is_a_divergence(tmp_path):
    cfg = config_from_dict(tiny_cfg(tmp_path, steps=40, mixed_precision="fp16"))
    tr = Trainer(cfg, method=nan_grads_at(build_method(cfg), set(range(40))))
    with pytest.raises(TrainingDiverged, match="gradient of loss 'main' is non-finite") as info:
        tr.train()
    # torch's initial scale 2^16 halves to below 1 after 17 overflows (steps 0..16); step 17 is reported
    assert info.value.step == 17


def test_fp16_resume_restores_the_loss_scaler_exactly(tmp_path):
    def run(out, steps, states):
        cfg = config_from_dict(tiny_cfg(tmp_path, output_dir=str(out), steps=steps, checkpoint_every=3,
                                        mixed_precision="fp16"))
        tr = Trainer(cfg, method=nan_grads_at(build_method(cfg), {1, 4}), accelerator=_acc())
        tr.train(callback=lambda t, lg: states.append(dict(t.scaler.state_dict())))
        return tr

    full, part, resumed = [], [], []
    run(tmp_path / "full", 6, full)
    run(tmp_path / "part", 3, part)
    ck = read_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"))[0]
    # 256 halved by the skip at step 1; one good step (2) since
    assert float(ck["scaler/scale"]) == 128 and int(ck["scaler/growth_tracker"]) == 1
    tr = run(tmp_path / "part", 6, resumed)
    assert part[-1] == full[2] and resumed == full[3:]  # scale and growth tracker continue exactly
    assert tr.scaler.get_scale() == 64


def test_bf16_resume_is_exact(tmp_path):
    def run(out, steps):
        tr = Trainer(config_from_dict(tiny_cfg(tmp_path, output_dir=str(out), steps=steps, checkpoint_every=3,
                                               mixed_precision="bf16")))
        return tr, tr.train()

    full, rec_full = run(tmp_path / "full", 6)
    run(tmp_path / "part", 3)
    resumed, rec_res = run(tmp_path / "part", 6)
    assert [r["loss/main"] for r in rec_res] == [r["loss/main"] for r in rec_full[3:]]
    for k, v in full.state_tensors().items():
        torch.testing.assert_close(resumed.state_tensors()[k], v, rtol=0, atol=0, msg=k)


def test_fp16_loss_tracks_fp32(tmp_path):
    a = Trainer(config_from_dict(tiny_cfg(tmp_path / "a", steps=2))).train()
    b = Trainer(config_from_dict(tiny_cfg(tmp_path / "b", steps=2, mixed_precision="fp16")), accelerator=_acc()).train()
    # step 0's output layer is zero (the loss is exact); step 1 runs the net in half precision
    assert a[0]["loss/main"] == b[0]["loss/main"] and a[1]["loss/main"] != b[1]["loss/main"]
    # fp16's 2^-11 rounding unit through a 16-wide, 2-block MLP after one AdamW step: well inside 1e-2
    assert b[1]["loss/main"] == pytest.approx(a[1]["loss/main"], rel=1e-2)


@pytest.mark.parametrize("network", [
    {"kind": "mlp", "in_dim": 2, "width": 16, "depth": 2, "num_classes": 8},
])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, network):
    plain = Trainer(config_from_dict(tiny_cfg(tmp_path / "a", steps=3, network=network)))
    plain.train()
    ck = Trainer(config_from_dict(tiny_cfg(tmp_path / "b", steps=3, network=network,
                                           gradient_checkpointing=True)))
    assert ck.networks["net"].gradient_checkpointing is True
    calls = []
    orig = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        ck.train()
    finally:
        torch.utils.checkpoint.checkpoint = orig
    assert len(calls) == 3 * 2  # steps x residual blocks (one micro-batch)
    for k, v in plain.state_tensors().items():
        torch.testing.assert_close(ck.state_tensors()[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_gradient_checkpointing_reaches_diffusers_models():
    from fastgen.models.nets import DigitsUNet

    net = DigitsUNet(block_out_channels=(16, 32), num_classes=10)
    assert enable_gradient_checkpointing("net", net) == 1
    assert net.unet.is_gradient_checkpointing
    with pytest.raises(ValueError, match="gradient_checkpointing: network 'head'"):
        enable_gradient_checkpointing("head", nn.Linear(2, 2))


def test_network_slots_bind_prepared_networks_only_during_the_step():
    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    net, disc = nn.Linear(2, 2), nn.Linear(2, 1)
    holder = nn.Sequential(net)  # e.g. EDMDenoiser(net): the method calls the net through a module
    method = SimpleNamespace(net=net, denoiser=holder, heads={"d": disc})
    pw, dw = Wrap(net), Wrap(disc)
    slots = NetworkSlots(method, {"net": (net, pw), "disc": (disc, dw)})
    with slots.bound():
        assert method.net is pw and holder[0] is pw and method.heads["d"] is dw
    assert method.net is net and holder[0] is net and method.heads["d"] is disc
    assert NetworkSlots(method, {"net": (net, net)}).slots == []  # one process: nothing to swap
    hidden = SimpleNamespace(call=lambda x: net(x))
    with pytest.raises(ValueError, match=r"networks \['net'\] are not held"):
        NetworkSlots(hidden, {"net": (net, pw)})


@pytest.mark.parametrize("over, match", [
    ({"mixed_precision": "fp8"}, "mixed_precision must be 'no', 'fp16' or 'bf16'"),
    ({"mixed_precision": "float16"}, "mixed_precision must be"),
    ({"frozen_sharding": "half"}, "frozen_sharding must be 'replicate' or 'shard'"),
])
def test_bad_accel_settings_refused_by_name(tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(tiny_cfg(tmp_path, **over))


def test_start_up_refusals(tmp_path):
    with pytest.raises(ValueError, match="frozen_sharding: 'shard' needs FSDP"):
        Trainer(config_from_dict(tiny_cfg(tmp_path, frozen_sharding="shard")))
    from accelerate import Accelerator

    real = Accelerator(cpu=True)
    fake = SimpleNamespace(device=real.device, num_processes=1, process_index=0, mixed_precision="bf16",
                           distributed_type=real.distributed_type)
    with pytest.raises(ValueError, match="config says 'no' but the accelerator was built with 'bf16'"):
        Trainer(config_from_dict(tiny_cfg(tmp_path)), accelerator=fake)
