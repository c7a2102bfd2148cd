"""Peak RSS of ``fastgen sample`` at ``--num 2000`` vs ``--num 200000``: samples are streamed to disk.

Each run is a fresh subprocess started by a small wrapper process, which reports
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the child's peak resident set, kB on Linux) after
waiting for it, so the two measurements never mix. Same model, sampler, steps and batch size for both;
only ``--num`` changes. Writes ``benchmarks/results/sample_memory.md``.

Done when (issue 13): peak RSS at 200000 is within 10% of the peak at 2000.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sample_memory.py``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--model", "digits-edm", "--sampler", "euler", "--steps", "2", "--batch-size", "1000", "--seed", "0",
        "--no-progress"]
WRAPPER = (
    "import resource, subprocess, sys, json\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def peak_rss_kb(num: int, out: Path) -> tuple[int, float]:
    """``(peak RSS in kB, wall seconds)`` of one ``fastgen sample --num NUM --out OUT`` process."""
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "fastgen.cli", "sample", *ARGS,
           "--num", str(num), "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    secs = time.perf_counter() - t0
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    if rec["rc"] != 0:
        raise RuntimeError(f"fastgen sample --num {num} exited {rec['rc']}: {res.stderr[-2000:]}")
    return int(rec["maxrss_kb"]), secs


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for num in (2000, 200000):
            out = Path(tmp) / f"s{num}.npz"
            kb, secs = peak_rss_kb(num, out)
            size = out.stat().st_size
            rows.append((num, kb, secs, size))
            out.unlink()
            print(f"--num {num}: peak RSS {kb / 1024:.1f} MiB, {secs:.1f} s, output {size / 2**20:.1f} MiB")
    (n0, kb0, _, _), (n1, kb1, _, size1) = rows
    ratio = kb1 / kb0
    ok = ratio <= 1.10
    held = n1 * 64 * 4 / 2**20  # what holding every float32 (1, 8, 8) sample would cost
    lines = [
        f"`fastgen sample {' '.join(ARGS)} --num N --out s.npz`, one fresh process per N, peak RSS from "
        "`getrusage(RUSAGE_CHILDREN).ru_maxrss` of a wrapper process (`benchmarks/bench_sample_memory.py`).",
        "",
        "| --num | peak RSS (MiB) | wall (s) | output (MiB) |",
        "|---:|---:|---:|---:|",
        *[f"| {n} | {kb / 1024:.1f} | {s:.1f} | {sz / 2**20:.1f} |" for n, kb, s, sz in rows],
        "",
        f"Ratio 200000 / 2000: **{ratio:.3f}** ({'within' if ok else 'NOT within'} 10%). Holding all {n1} samples "
        f"would add {held:.0f} MiB of samples alone (plus the noise tensor, as much again); streamed, the .npz "
        f"grows on disk ({size1 / 2**20:.0f} MiB) while memory stays at one batch. What still grows with N: "
        "the per-sample class labels (8 bytes each, 1.5 MiB at 200000).",
        "",
    ]
    from benchmarks.common import write_section

    path = write_section("sample_memory", "fastgen sample: peak RSS vs --num", "\n".join(lines))
    print(f"ratio {ratio:.3f} -> {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
