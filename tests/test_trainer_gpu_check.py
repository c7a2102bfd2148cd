"""``benchmarks/gpu_check.py --cpu-smoke``: every section of the GPU check runs (reduced) on the CPU, so the
check a CUDA machine runs with ``make gpu-check`` does not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_precision_agreement_is_within_the_half_precision_units(smoke):
    assert smoke["device"] == "CPU" and smoke["smoke"] is True
    # a 10-step solve of digits-edm: errors of a few rounding units (fp16 2^-11 ~ 4.9e-4, bf16 2^-8 ~ 3.9e-3)
    # per network call, not compounding: bounded by 10 units and non-zero (autocast really ran)
    for solver in ("euler", "heun", "dpmpp_2m"):
        r = smoke["solvers"][solver]
        assert 0 < r["fp16"] < 10 * 2.0**-11 and 0 < r["bf16"] < 10 * 2.0**-8, (solver, r)
        assert r["fp16"] < r["bf16"]  # 3 more mantissa bits
    for sched in ("DDIMScheduler", "EulerDiscreteScheduler"):  # half-precision weights, not only activations
        r = smoke["schedulers"][sched]
        assert 0 < r["fp16"] < 0.05 and 0 < r["bf16"] < 0.1, (sched, r)


def test_every_other_section_reports(smoke):
    assert smoke["attention"]["status"].startswith("skipped: xformers")  # not installed on this machine
    d = smoke["distillation"]
    assert d["path"].startswith("text-to-image (digits-sd") and d["batch"] == 4 and d["it_per_s"] > 0
    # the timed steps are distribution matching (student and critic steps), not the config's warm-up regression
    assert d["losses"] == ["loss/critic", "loss/student"] and d["mixed_precision"] == "no"
    assert d["repeats"] == 3 and 0 < d["it_per_s_min"] <= d["it_per_s"] <= d["it_per_s_max"]
    assert "distillation_bf16" not in smoke  # bf16 is timed on GPUs only
    s = smoke["samples"]
    assert s["teacher_unet_calls"] == 4 and s["student_unet_calls"] == 1  # 2 DDIM steps x CFG vs one step
    for who in ("teacher", "student"):  # a mean over the timed repeats lies between their extremes
        assert 0 < s[f"{who}_samples_per_s_min"] <= s[f"{who}_samples_per_s"] <= s[f"{who}_samples_per_s_max"]
    assert s["repeats"] == 3
    assert smoke["fsdp"]["status"].startswith("skipped: accelerate selects FSDP only on GPUs")
    assert set(smoke["seconds"]) == {"solvers", "schedulers", "attention", "distillation", "samples", "fsdp"}
