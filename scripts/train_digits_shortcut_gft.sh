#!/usr/bin/env bash
# The exact commands that trained fastgen/models/weights/digits-{shortcut,gft}.* (1 CPU thread), then
# exported the trainer's EMA network into the package with a model card (FD_digits measured at export).
#
#   bash scripts/train_digits_shortcut_gft.sh shortcut     # fastgen/configs/train/digits-shortcut.yaml
#   bash scripts/train_digits_shortcut_gft.sh gft          # fastgen/configs/train/digits-gft.yaml (needs digits-edm)
#
# The shipped weights were made by exactly
#   bash scripts/train_digits_shortcut_gft.sh shortcut                  # 8000 steps, ~45 min on the shared CPU
#   bash scripts/train_digits_shortcut_gft.sh gft --set steps=2000      # from the final digits-edm, ~3 min
# (an earlier GFT run fine-tuned from the EMA of the teacher run's step-4000 checkpoint via
#  --set method.init=<that file>.safetensors; any safetensors path or zoo name works as init).
#
# Extra arguments are passed to `fastgen train` (e.g. --set steps=4000). Resumable: re-running continues
# from the latest checkpoint in runs/digits-<model>.
set -euo pipefail
MODEL=${1:?usage: train_digits_shortcut_gft.sh shortcut|gft [--set key=value ...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=fastgen/configs/train/digits-${MODEL}.yaml
OMP_NUM_THREADS=1 "$PY" -m fastgen.cli train "$CONFIG" --set progress=false "$@"
OMP_NUM_THREADS=1 "$PY" - "$MODEL" "$CONFIG" "$*" <<'EOF'
import json, sys
from pathlib import Path

import torch

from fastgen.metrics import digits_fd
from fastgen.models.nets import build_network
from fastgen.models.zoo import ema_state_from_checkpoint, export_model
from fastgen.samplers.guidance import cfg as cfg_guidance, gft
from fastgen.samplers.shortcut import shortcut_denoiser, shortcut_sample
from fastgen.train.checkpoint import latest_checkpoint
from fastgen.train.config import load_config

model, config, extra_args = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config(config, [a for a in extra_args.split() if "=" in a])
# training wall time: sum of the wall_s at the end of each (resumed) segment of metrics.jsonl
recs = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if line]
wall = 0.0
for i, r in enumerate(recs):
    if i + 1 == len(recs) or recs[i + 1]["wall_s"] < r["wall_s"]:
        wall += r["wall_s"]
wall = round(wall)
samples_per_s = recs[-1].get("samples_per_s")
ck = latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
state = ema_state_from_checkpoint(ck)
if model == "shortcut":
    state = {k[len("backbone."):]: v for k, v in state.items()}
net_kw = dict(cfg.network)
net = build_network(net_kw.pop("kind"), **net_kw)
net.load_state_dict(state)
net.eval().requires_grad_(False)
torch.set_num_threads(1)
n = 900
labels = torch.arange(n) % 10
noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
fds = {}
if model == "shortcut":
    max_steps = int(cfg.method.get("max_steps", 128))
    den_spec = {"type": "shortcut", "max_steps": max_steps, "d_key": "d"}
    sc = shortcut_denoiser(net, max_steps).model
    with torch.no_grad():
        for k in (1, 2, 4, 8, 128):
            fds[f"{k} steps"] = digits_fd(shortcut_sample(sc, noise, k, class_labels=labels).clamp(-1, 1))
    usage = ("from fastgen.models import load\nfrom fastgen.samplers.shortcut import shortcut_sample\n"
             "D = load(\"digits-shortcut\")           # flow-matching head as a VE denoiser (d = 1/128)\n"
             "x = shortcut_sample(D.model, torch.randn(16, 1, 8, 8), 4, class_labels=torch.arange(16) % 10)")
else:
    den_spec = {"type": "edm", "sigma_data": float(cfg.method.get("sigma_data", 0.5))}
    from fastgen.core.denoiser import EDMDenoiser
    from fastgen.core.schedules import karras
    from fastgen.core.solvers import heun

    den = EDMDenoiser(net, sigma_data=den_spec["sigma_data"])
    sig = karras(32, 0.002, 80.0)
    with torch.no_grad():
        for w in (1.0, 1.5, 2.0, 3.0):
            fds[f"beta=1/{w:g}, Heun 32 steps"] = digits_fd(heun(gft(den, w), noise * sig[0], sig, class_labels=labels).clamp(-1, 1))
    usage = ("from fastgen.models import load\nfrom fastgen.samplers.guidance import gft\n"
             "D = gft(load(\"digits-gft\"), 2.0)      # beta = 1/2: CFG-like w = 2 in ONE pass per step")
cmd = f"bash scripts/train_digits_shortcut_gft.sh {model}" + (f" {extra_args}" if extra_args else "")
fd_rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in fds.items())
card = f"""# digits-{model}

{'Class-conditional shortcut model (Frans et al. 2025) on the 8x8 digits: one network, 1 to 128 steps.' if model == 'shortcut' else f"Guidance-free-trained (GFT, Chen et al. 2025) digits model, fine-tuned from `{cfg.method.get('init')}`: sample at beta = 1/w with one network call per step."}

- config: `{config}` (network `{cfg.network}`, method `{cfg.method}`)
- seed {cfg.seed}, {cfg.steps} steps at batch {cfg.batch_size}, EMA {cfg.ema.decay}; training wall time {wall} s
  on 1 CPU thread of a heavily shared 2-core machine (last logged throughput {samples_per_s:.0f} samples/s)
- command: `{cmd}`
- checkpoint exported: `{ck}` (trainer EMA weights)

FD_digits (900 samples, 90 per class, against the 899 held-out test digits; the 898 train digits score 1.122):

| sampling | FD_digits |
|---|---|
{fd_rows}

```python
import torch
{usage}
```
"""
extra = {"config": config, "seed": cfg.seed, "steps": cfg.steps, "wall_time_s": wall, "command": cmd,
         "samples_per_s": samples_per_s,
         "fd_digits": fds, "method": cfg.method}
print(export_model(net, f"digits-{model}", cfg.network, den_spec, card=card, extra=extra, dtype=torch.float16))
print(card)
EOF
