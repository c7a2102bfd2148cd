#!/usr/bin/env bash
# Learn the DP schedules shipped for the digits pipelines (used by `fastgen demo` and by
# `fastgen sample --model digits-sd --sampler dpmpp_2m --schedule dp --steps N`).
# Writes fastgen/models/weights/schedules/<pipeline>/dp-dpmpp_2m-nfe{4,6,8}.json.
# Training prompts: "a handwritten digit {zero..nine}" (cycled over the noises), seed 0, no guidance.
# digits-sd: the CLI defaults (128 teacher trajectories, 40-interval grid), ~30 s on a shared 2-core CPU.
# digits-sd3: 32 trajectories on a 20-interval grid (uniform in flow time: the CLI default for flow pipelines) (its flow range starts at sigma 1000, where the
# teacher trajectories are slow: ~5 min on a shared 2-core CPU).
# Re-run after a pipeline is rebuilt: the JSONs record the model fingerprint they were learned for.
# Run: OMP_NUM_THREADS=1 bash scripts/make_pipeline_schedules.sh [digits-sd] [digits-sd3]
set -euo pipefail
cd "$(dirname "$0")/.."
FASTGEN=${FASTGEN:-.venv/bin/fastgen}
PROMPTS=()
for d in zero one two three four five six seven eight nine; do PROMPTS+=(--prompt "a handwritten digit $d"); done
for model in "${@:-digits-sd digits-sd3}"; do
  for m in $model; do
    out=fastgen/models/weights/schedules/$m
    mkdir -p "$out"
    extra=()
    if [ "$m" = digits-sd3 ]; then extra=(--num-noise 32 --grid-size 20); fi
    "$FASTGEN" schedule dp --model "$m" --solver dpmpp_2m --nfe 4 6 8 --seed 0 --no-progress "${extra[@]}" \
      "${PROMPTS[@]}" --out "$out/dp-dpmpp_2m-nfe{nfe}.json"
  done
done
