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


# --------------------------------------------------------------------------------------------
# Distillation it/s at equal batch in two checkouts (before/after a trainer change)
# --------------------------------------------------------------------------------------------

DISTILL_CFG = {
    "steps": 10**6, "batch_size": 256, "progress": False, "cpu": True, "seed": 0,
    "checkpoint_every": 10**6, "log_every": 10**6,
    "data": {"name": "mixture", "mixture": "ring", "mixture_options": {"weights": "imbalanced"},
             "num_samples": 8192},
    "network": {"kind": "mlp", "in_dim": 2, "width": 128, "depth": 3},
    "method": {"name": "fdistill", "teacher": {"kind": "mixture", "mixture": "ring",
                                               "options": {"weights": "imbalanced"}},
               "class_conditional": False, "divergence": "js", "placement": "input",
               "sigma_min": 0.02, "sigma_max": 10.0, "student_every": 2, "lambda_gan": 0.001},
    "optim": {"lr": 0.001, "betas": [0.0, 0.99], "grad_clip": 10.0},
    "ema": {"decay": 0.99, "every": 2},
}


def distill_its(steps: int = 20, warmup: int = 4) -> tuple[float, float]:
    """Optimizer steps per second of f-distill (ring JS, ResidualMLP 128x3, batch 256, 1 thread) with
    whatever ``fastgen`` is on ``PYTHONPATH`` (so the same function times two checkouts): per wall-clock
    second and per second of this process's CPU time (one thread: the work done, whatever else the shared
    machine runs meanwhile)."""
    import fastgen.distill  # noqa: F401  (registers fdistill)

    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(config_from_dict({**DISTILL_CFG, "output_dir": out}))
        for _ in range(warmup):
            tr.train_step()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            tr.train_step()
        return steps / (time.perf_counter() - t), steps / (time.process_time() - c)


def compare_checkouts(before: str, after: str, repeats: int = 7, steps: int = 30) -> None:
    """Time :func:`distill_its` alternately in two source trees (fresh processes, interleaved so drift
    of the shared CPU hits both) and write ``benchmarks/results/training_throughput.md``."""
    import json
    import math
    import os
    import statistics
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve()
    code = ("import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
            "import importlib.util as u; s = u.spec_from_file_location('b', sys.argv[2]); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print(*m.distill_its(int(sys.argv[3])))")
    res: dict[str, dict[str, list[float]]] = {"before": {"wall": [], "cpu": []}, "after": {"wall": [], "cpu": []}}
    for _ in range(repeats):
        for name, tree in (("before", before), ("after", after)):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tree}
            r = subprocess.run([sys.executable, "-c", code, tree, str(here), str(steps)], env=env,
                               capture_output=True, text=True, check=True)
            wall, cpu = (float(v) for v in r.stdout.strip().splitlines()[-1].split())
            res[name]["wall"].append(wall)
            res[name]["cpu"].append(cpu)
            print(name, wall, cpu, flush=True)

    t975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}

    def ci(v: list[float]) -> str:
        m = statistics.fmean(v)
        half = t975.get(len(v), 2.0) * statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
        return f"{m:.2f} +- {half:.2f}"

    def paired(kind: str) -> str:  # geometric mean of the per-repeat after/before ratios, 95% interval
        logs = [math.log(a / b) for a, b in zip(res["after"][kind], res["before"][kind])]
        m = statistics.fmean(logs)
        half = t975.get(len(logs), 2.0) * statistics.stdev(logs) / len(logs) ** 0.5
        return f"{math.exp(m):.3f} [{math.exp(m - half):.3f}, {math.exp(m + half):.3f}]"

    rows = [[k, ci(res["before"][k]), ci(res["after"][k]), paired(k)] for k in ("cpu", "wall")]
    body = (
        "f-distill (ring mixture, JS, placement input, ResidualMLP 128x3 student and fake score), batch 256, "
        f"fp32, 1 CPU thread, `Trainer.train_step` timed over {steps} steps after 4 warm-up steps, "
        f"{repeats} fresh processes per checkout, interleaved (the 2 CPU cores are shared with other jobs, "
        "so wall-clock rates swing with the load; the per-CPU-second rate counts the work one thread did). "
        f"Mean +- the 95% t-interval half-width over {repeats} repeats; *after / before* is the geometric mean "
        "of the paired per-repeat ratios with its 95% interval.\n\n"
        f"- before: `{before}`\n- after: `{after}`\n\n"
        + markdown_table(["optimizer steps per", "before", "after", "after / before"],
                         [["CPU second" if r[0] == "cpu" else "wall second", *r[1:]] for r in rows])
        + f"\n\nRaw: `{json.dumps(res)}`\n"
    )
    from benchmarks.common import assemble

    path = write_section("training_throughput", "Distillation throughput before/after (it/s)", body)
    path.write_text(path.read_text().replace("bench_training_throughput.py", "bench_training.py --compare"))
    assemble()


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "--compare":  # --compare BEFORE_TREE AFTER_TREE
        compare_checkouts(sys.argv[2], sys.argv[3])
    else:
        main()
