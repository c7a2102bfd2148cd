"""Training throughput (samples/s) of fastgen's trainer on the digits and mixture test beds.

Measures ``Trainer.train_step`` (one optimizer step of the global batch, EMA included) for the
networks the shipped configs use, against a bare PyTorch loop (same method loss, AdamW, no EMA,
no clipping) to show the trainer's overhead. One CPU thread (the digits teacher was trained that way);
on a machine with a GPU the same rows are measured on it too.
"""

from __future__ import annotations

import tempfile
import time

import torch

from benchmarks.common import markdown_table, write_section
from fastgen.train import Trainer
from fastgen.train.config import config_from_dict

CASES = [
    ("digits EDM, ResidualMLP 256x4 (the teacher)", "digits",
     {"kind": "mlp", "in_dim": 64, "width": 256, "depth": 4, "mult": 2, "num_classes": 10}, "edm"),
    ("digits flow, ResidualMLP 256x4", "digits",
     {"kind": "mlp", "in_dim": 64, "width": 256, "depth": 4, "mult": 2, "num_classes": 10}, "flow"),
    ("digits EDM, DigitsUNet (32, 64)", "digits",
     {"kind": "unet", "block_out_channels": [32, 64], "num_classes": 10}, "edm"),
    ("digits EDM, DigitsUNet (64, 128)", "digits",
     {"kind": "unet", "block_out_channels": [64, 128], "num_classes": 10}, "edm"),
    ("ring mixture EDM, ResidualMLP 128x3", "mixture",
     {"kind": "mlp", "in_dim": 2, "width": 128, "depth": 3, "mult": 2, "num_classes": 8}, "edm"),
]


def _cfg(data: str, network: dict, method: str, device_cpu: bool, out: str) -> dict:
    return {
        "output_dir": out, "steps": 10**6, "batch_size": 256, "progress": False, "cpu": device_cpu,
        "checkpoint_every": 10**6, "log_every": 10**6,
        "data": {"name": data, "num_samples": 8192},
        "network": network, "method": {"name": method},
    }


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(data: str, network: dict, method: str, cpu: bool, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(trainer samples/s, bare-loop samples/s) for one case."""
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(config_from_dict(_cfg(data, network, method, cpu, out)))
        for _ in range(warmup):
            tr.train_step()
        _sync(tr.device)
        t = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        _sync(tr.device)
        trainer_sps = steps * 256 / (time.perf_counter() - t)
        # bare loop: same method/loss, plain AdamW
        m = tr.method
        opt = torch.optim.AdamW([p for n in m.networks().values() for p in n.parameters()], lr=1e-4)
        idx = torch.arange(256, device=tr.device) % tr.n_data
        batch = {k: v[idx] for k, v in tr.data.items()}
        g = torch.Generator().manual_seed(0)
        for i in range(warmup + steps):
            if i == warmup:
                _sync(tr.device)
                t = time.perf_counter()
            loss = m.step(batch, i, g)["main"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(tr.device)
        bare_sps = steps * 256 / (time.perf_counter() - t)
    return trainer_sps, bare_sps


def main(steps: int = 20) -> None:
    torch.set_num_threads(1)
    rows = []
    devices = [("CPU (1 thread)", True)]
    if torch.cuda.is_available():
        devices.append((torch.cuda.get_device_name(0), False))
    ref = None
    for dev_name, cpu in devices:
        for name, data, network, method in CASES:
            tsps, bsps = measure(data, network, method, cpu, steps)
            if ref is None:
                ref = tsps
            from fastgen.models.nets import build_network, count_parameters

            kw = dict(network)
            params = count_parameters(build_network(kw.pop("kind"), **kw))
            rows.append([dev_name, name, f"{params / 1e6:.2f}M", tsps, tsps / ref, bsps / tsps])
            print(rows[-1], flush=True)
    body = (
        "Batch 256 per optimizer step, fp32, `Trainer.train_step` (EMA, grad clipping, lr schedule "
        "included) timed over "
        f"{steps} steps after 3 warm-up steps. *vs teacher* is the throughput relative to the first row; "
        "*bare / trainer* is a plain PyTorch loop (same loss, AdamW only) over the trainer: the trainer's "
        "overhead factor. The CPU is shared with other jobs (2 cores, several processes), so absolute "
        "numbers are noisy; ratios measured in the same run are the comparable quantity.\n\n"
        + markdown_table(
            ["device", "model", "params", "samples/s", "vs teacher", "bare / trainer"], rows
        )
    )
    write_section("training", "Training throughput (samples/s)", body)


if __name__ == "__main__":
    main()
