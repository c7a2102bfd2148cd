#!/usr/bin/env bash
# The exact command that trained fastgen/models/weights/digits-edm.safetensors (1 CPU thread),
# then exported the EMA weights into the package. Resumable: re-running continues from the latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 python -m fastgen.cli train configs/train/digits-edm.yaml --set progress=false "$@"
OMP_NUM_THREADS=1 python -m fastgen.models.zoo export runs/digits-edm digits-edm \
  --config configs/train/digits-edm.yaml
