#!/usr/bin/env bash
# Distill the embedded digits teacher into one-step students, one per divergence, and record
# FD_digits in benchmarks/results/fdistill_digits.json (read by benchmarks/bench_fdistill.py).
#
#   OMP_NUM_THREADS=1 bash scripts/distill_digits.sh [STEPS] [DIVERGENCES...]
#   e.g. bash scripts/distill_digits.sh 6000 js forward_kl hellinger reverse_kl
#
# TEACHER (env) overrides method.teacher, e.g. a trainer checkpoint while digits-edm is not shipped:
#   TEACHER='{"kind": "checkpoint", "path": "runs/digits-edm/checkpoints/step_00010000",
#             "network": {"kind": "mlp", "in_dim": 64, "width": 256, "depth": 4, "mult": 2, "num_classes": 10}}'
# EXPORT=1 also writes each student into fastgen/models/weights/digits-fdistill-<div>.*
# PARALLEL=1 runs the divergences as parallel processes (one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-6000}"
shift || true
DIVS=("$@")
[ ${#DIVS[@]} -eq 0 ] && DIVS=(js forward_kl hellinger reverse_kl)
PY="${PYTHON:-.venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for div in "${DIVS[@]}"; do
  args=(distill "fastgen/configs/distill/digits-${div}.yaml" --set "steps=${STEPS}" --no-progress --eval 900)
  [ -n "${TEACHER:-}" ] && args+=(--set "method.teacher=${TEACHER}")
  [ -n "${EXPORT:-}" ] && args+=(--export "digits-fdistill-${div}")
  echo ">>> fastgen ${args[*]}"
  if [ -n "${PARALLEL:-}" ]; then
    "$PY" -m fastgen.cli "${args[@]}" > "runs/digits-fdistill-${div}.log" 2>&1 &
  else
    "$PY" -m fastgen.cli "${args[@]}"
  fi
done
wait
"$PY" - "${DIVS[@]}" <<'PYEOF'
"""Collect the runs' student.json files into benchmarks/results/fdistill_digits.json."""
import json, os, sys
from pathlib import Path

import torch

from fastgen.core import solvers
from fastgen.core.schedules import karras
from fastgen.distill.fdistill import build_teacher
from fastgen.metrics import digits_fd

teacher_spec = json.loads(os.environ["TEACHER"]) if os.environ.get("TEACHER") else "digits-edm"
teacher, _ = build_teacher(teacher_spec)
g = torch.Generator().manual_seed(12345)  # same noise/labels as fastgen distill --eval
labels = torch.arange(900) % 10
with torch.no_grad():
    x = solvers.heun(teacher, torch.randn(900, 1, 8, 8, generator=g) * 80.0, karras(18, 0.002, 80.0),
                     class_labels=labels)
out = Path("benchmarks/results/fdistill_digits.json")
data = json.loads(out.read_text()) if out.is_file() else {"students": {}}
data["teacher"] = {"fd": float(digits_fd(x.clamp(-1, 1))), "nfe": 35}
data["teacher_name"] = teacher_spec if isinstance(teacher_spec, str) else json.dumps(teacher_spec)
for div in sys.argv[1:]:
    meta = json.loads(Path(f"runs/digits-fdistill-{div}/student.json").read_text())["metadata"]
    data["students"][div] = {"fd": meta["fd_digits_test"], "steps": meta["steps"],
                             "minutes": meta["minutes_this_invocation"]}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(data, indent=1) + "\n")
print(json.dumps(data, indent=1))
PYEOF
