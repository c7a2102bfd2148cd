"""Metrics benchmark: fastgen vs torchmetrics used directly, and memory constant in N.

1. Inception feature extraction (images/s) and total FID time, fastgen vs torchmetrics'
   ``FrechetInceptionDistance`` given the same network as its feature module, in one run (ratio).
   CPU, a seeded random network (the throughput does not depend on the weights), 32x32 inputs.
2. The same for the digits feature network at 50,000 samples per side.
3. Peak resident memory of streaming 1k..50k samples' statistics (digits features, each N in a fresh
   process): constant in N. For Inception the statistics state is 2 x 2048^2 float64 = 64 MiB.

Run: ``python -m benchmarks.bench_metrics`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
from torch import nn

from benchmarks.common import RESULTS, markdown_table, write_section

N_INCEPTION = 8  # images per side (each is a 299x299 forward of a 24M-parameter net)
BATCH_INCEPTION = 4
N_DIGITS = 50_000
BATCH_DIGITS = 5_000
MEM_SIZES = (1_000, 10_000, 50_000)


def _digits_like(n: int, seed: int) -> torch.Tensor:
    from fastgen.data import load_digits_split

    gen = torch.Generator().manual_seed(seed)
    base = load_digits_split("all").images
    idx = torch.randint(0, base.shape[0], (n,), generator=gen)
    return (base[idx] + 0.1 * torch.randn(n, 1, 8, 8, generator=gen)).clamp(-1, 1)


def _time(fn, repeats: int = 1) -> tuple[float, object]:
    """Best CPU time (``time.process_time``: all threads of this process) of ``fn`` and its result.

    CPU time rather than wall time: the benchmark machine is shared, and other jobs' load moves wall
    time by tens of percent between two identical runs, while this process's CPU time stays put.
    """
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def bench_inception() -> list[list[object]]:
    import tempfile
    from pathlib import Path

    from torchmetrics.image.fid import FrechetInceptionDistance

    from fastgen.metrics import InceptionExtractor, extract_features, fid, images_to_uint8
    from fastgen.metrics import inception as inc

    gen = torch.Generator().manual_seed(0)
    real = torch.rand(N_INCEPTION, 3, 32, 32, generator=gen) * 2 - 1
    fake = torch.rand(N_INCEPTION, 3, 32, 32, generator=gen) * 2 - 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "random-inception.pth"
        torch.save(inc.random_inception_state_dict(0), path)
        ex = InceptionExtractor(path, sha256=None)
        _ = ex.net
        ex(real[:2])  # warm-up

        class Pool(nn.Module):
            num_features = 2048

            def forward(self, x):
                return ex.net(x)[0]

        real_u8, fake_u8 = images_to_uint8(real), images_to_uint8(fake)

        def tm_features():
            m = FrechetInceptionDistance(feature=Pool())
            for i in range(0, N_INCEPTION, BATCH_INCEPTION):
                m.update(real_u8[i : i + BATCH_INCEPTION], real=True)
            return m

        def tm_fid():
            m = tm_features()
            for i in range(0, N_INCEPTION, BATCH_INCEPTION):
                m.update(fake_u8[i : i + BATCH_INCEPTION], real=False)
            return float(m.compute())

        def fg_features():
            return extract_features(real, ex, batch_size=BATCH_INCEPTION, progress=False)

        def fg_fid():
            return fid(fake, real, features=ex, batch_size=BATCH_INCEPTION, progress=False)

        t_tm_f, _ = _time(tm_features)
        t_fg_f, _ = _time(fg_features)
        t_fg, v_fg = _time(fg_fid)  # opposite order to the feature timing: drift in load hits both
        t_tm, v_tm = _time(tm_fid)
    return [
        ["Inception feature extraction (images/CPU-s)", N_INCEPTION / t_fg_f, N_INCEPTION / t_tm_f, t_tm_f / t_fg_f],
        ["Inception total FID time (CPU s)", t_fg, t_tm, t_tm / t_fg],
        ["Inception FID value (random net)", v_fg, v_tm, f"abs diff {abs(v_fg - v_tm):.2g}"],
    ]


def bench_digits() -> list[list[object]]:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from fastgen.metrics import extract_features, fid
    from fastgen.metrics.digits import load_digits_classifier

    real, fake = _digits_like(N_DIGITS, 0), _digits_like(N_DIGITS, 1)
    net = load_digits_classifier()

    def tm_features():
        m = FrechetInceptionDistance(feature=net)
        for i in range(0, N_DIGITS, BATCH_DIGITS):
            m.update(real[i : i + BATCH_DIGITS], real=True)
        return m

    def tm_fid():
        m = tm_features()
        for i in range(0, N_DIGITS, BATCH_DIGITS):
            m.update(fake[i : i + BATCH_DIGITS], real=False)
        return float(m.compute())

    def fg_features():
        return extract_features(real, "digits", batch_size=BATCH_DIGITS, progress=False)

    def fg_fid():
        return fid(fake, real, features="digits", batch_size=BATCH_DIGITS, progress=False)

    # interleaved repeats (best of 5 each), so a load change on a shared machine hits both sides
    t_tm_f = t_fg_f = t_tm = t_fg = float("inf")
    for _ in range(5):
        t_tm_f = min(t_tm_f, _time(tm_features)[0])
        t_fg_f = min(t_fg_f, _time(fg_features)[0])
        t, v_tm = _time(tm_fid)
        t_tm = min(t_tm, t)
        t, v_fg = _time(fg_fid)
        t_fg = min(t_fg, t)
    return [
        ["digits feature extraction (images/CPU-s)", N_DIGITS / t_fg_f, N_DIGITS / t_tm_f, t_tm_f / t_fg_f],
        ["digits total FD time, 50k vs 50k (CPU s)", t_fg, t_tm, t_tm / t_fg],
        ["digits FD value", v_fg, v_tm, f"rel diff {abs(v_fg - v_tm) / abs(v_tm):.2g}"],
    ]


def _peak_rss_child(n: int) -> None:
    """Run in a fresh process: stream n digits samples' statistics, print peak RSS (MiB) as JSON."""
    import resource

    from fastgen.metrics import extract_features

    def batches():
        for i in range(0, n, 1000):
            yield _digits_like(min(1000, n - i), seed=i)

    _digits_like(10, 0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    st = extract_features(batches(), "digits", progress=False).stats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": st.count, "base_mib": base, "peak_mib": peak}))


def bench_memory() -> tuple[list[list[object]], list[dict]]:
    rows, data = [], []
    for n in MEM_SIZES:
        out = subprocess.run(
            [sys.executable, "-c", f"from benchmarks.bench_metrics import _peak_rss_child as f; f({n})"],
            capture_output=True,
            text=True,
            check=True,
        )
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        data.append(rec)
        rows.append([rec["n"], rec["peak_mib"], rec["peak_mib"] - rec["base_mib"]])
    return rows, data


def _plot(data: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot([d["n"] for d in data], [d["peak_mib"] for d in data], "o-", label="peak RSS")
    above = [d["peak_mib"] - d["base_mib"] for d in data]
    ax.plot([d["n"] for d in data], above, "s--", label="above baseline")
    ax.set_xscale("log")
    ax.set_xlabel("samples streamed (digits features)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Statistics memory vs N")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "metrics_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def main() -> None:
    torch.set_num_threads(1)  # one thread: CPU time = work done (no OpenMP spin-waiting on a busy machine)
    rows = bench_inception() + bench_digits()
    mem_rows, data = bench_memory()
    png = _plot(data)
    body = (
        "fastgen vs torchmetrics' `FrechetInceptionDistance` used directly with the same feature network "
        "(same run, same inputs); ratio = torchmetrics time / fastgen time (>= 1.0 means no overhead). "
        f"Inception: a seeded random FID InceptionV3 (real weights are not downloaded), {N_INCEPTION} "
        f"32x32 images per side resized to 299 (fastgen: TF1 resize; torchmetrics gets fastgen's uint8 "
        f"images through the same network), batch {BATCH_INCEPTION}, CPU. Digits: {N_DIGITS:,} samples "
        f"per side, batch {BATCH_DIGITS:,}, best of 5 interleaved runs. "
        "Times are CPU seconds of the benchmark process (`time.process_time`, torch on 1 thread), because the "
        "machine is shared and wall time moves by tens of percent with other jobs' load; images/s = N / CPU s.\n\n"
        + markdown_table(["measurement", "fastgen", "torchmetrics", "ratio"], rows)
        + "\n\nPeak resident memory while streaming N samples' statistics (digits features, batches of "
        "1000 generated on the fly, a fresh process per N). The statistics are float64 sums "
        "(O(d^2)), so memory does not grow with N; with Inception (d = 2048) the state is "
        "2 x 2048^2 x 8 B = 64 MiB plus the network, also independent of N (not measured at 50k on CPU: "
        "a 50k-image Inception pass takes hours on 2 cores).\n\n"
        + markdown_table(["N", "peak RSS (MiB)", "above baseline (MiB)"], mem_rows)
    )
    if png:
        body += f"\n\n![statistics memory vs N]({png})"
    write_section("metrics", "Metrics: FID/FD throughput and memory", body)
    print(body)


if __name__ == "__main__":
    main()
