"""Reflow (2-rectified flow) and its one-step distillation: straightness and 1-, 2-, 4-step quality.

Claim (Liu, Gong, Liu, ICLR 2023; ``../shared/methods/reflow.md``): refitting a flow on its own (noise, ODE
endpoint) couplings straightens its paths, so few-step Euler improves sharply; distilling the straight flow at
t = 0 gives a one-step generator.

1. **Ring mixture** (the card's toy, sharper): the exact 1-rectified flow of the 8-mode ring (closed-form
   denoiser) vs the 2-rectified MLP trained by ``fastgen train mixture-reflow`` on its ODE pairs.
   Straightness S, and at 1, 2, 4 Euler steps: precision (share of samples within 3 std of a mode), modes hit,
   and L2 to the model's own ODE endpoint (128 Euler steps).
2. **Digits**: 1-RF = the embedded ``digits-flow``; 2-RF = ``fastgen train digits-reflow`` (pairs from
   digits-flow, fine-tuned from its weights; exported to the zoo as ``digits-reflow``); one-step student =
   ``fastgen train digits-reflow-distill`` (pairs from digits-reflow, t = eps only, L2). S and FD_digits (test
   split, 900 samples, 90 per class) at 1, 2, 4, 8 Euler steps uniform in t.

Intervals: 95% Student-t over evaluation seeds 0, 1, 2 (fresh noises; ``fastgen.metrics.coverage.mean_ci``).
Each model is one training run (seed 0), so the intervals cover sampling noise, not training variance.
Writes ``benchmarks/results/reflow.md`` and ``reflow.json``; runs go to ``runs/`` (re-running reuses them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, ROOT, markdown_table, write_section

SEEDS = (0, 1, 2)
N_DIGITS = 900
N_MIX = 2000
STEPS = (1, 2, 4, 8)
QUICK: list[str] = []  # --quick: overrides for a smoke run (tiny runs, zoo export to a temporary folder)


def train(name: str, runs: Path) -> tuple[object, float]:
    """Run the shipped config ``name`` (resuming / reusing ``runs/NAME``); returns the trainer and wall time."""
    from fastgen.commands._configs import resolve_config
    from fastgen.train import Trainer, load_config

    over = [f"output_dir={runs / name}", "progress=false", *QUICK]
    if QUICK and name == "digits-reflow-distill":
        over.append("method.teacher=digits-flow")  # the quick run's 2-RF is not in the zoo
    cfg = load_config(resolve_config(name, "train"), over)
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    tr.train()
    return tr, time.perf_counter() - t0


def euler_rf(den, z0: torch.Tensor, steps: int, **cond) -> torch.Tensor:
    """Rectified-flow Euler with ``steps`` uniform steps in t from t_eps (VE start ``RF_SIGMA_MAX * z0``)."""
    from fastgen.core.solvers import euler
    from fastgen.train.reflow_pairs import RF_SIGMA_MAX, rf_uniform_sigmas

    with torch.no_grad():
        return euler(den, z0 * RF_SIGMA_MAX, rf_uniform_sigmas(steps), **cond)


def _ci(vals: list[float]) -> str:
    from fastgen.metrics.coverage import mean_ci

    m, lo, hi = mean_ci(vals)
    return f"{m:.4g} [{lo:.4g}, {hi:.4g}]"


def _ci_tuple(vals: list[float]) -> tuple[float, float, float]:
    from fastgen.metrics.coverage import mean_ci

    return mean_ci(vals)


# ------------------------------------------------------------------------------------------ mixture


def mixture_section(runs: Path) -> tuple[str, dict]:
    from fastgen.data.toy import ring_mixture
    from fastgen.models import load_model
    from fastgen.train.reflow_pairs import straightness

    tr, wall = train("mixture-reflow", runs)
    mix = ring_mixture()
    models = {"1-RF (exact)": load_model("ring-mixture").denoiser,
              "2-RF (MLP)": tr.method.sampling_denoiser(tr.ema_network()).eval()}
    res: dict = {name: {} for name in models}
    for name, den in models.items():
        per: dict[str, list[float]] = {}
        for seed in SEEDS:
            z0 = torch.randn(N_MIX, 2, generator=torch.Generator().manual_seed(100 + seed))
            st = straightness(den, z0, steps=128)
            per.setdefault("S", []).append(st["S"])
            per.setdefault("S_norm", []).append(st["S_normalized"])
            for k in (1, 2, 4):
                x = euler_rf(den, z0, k)
                d = torch.cdist(x.double(), mix.means)
                near = d.min(1).values < 3 * float(mix.stds.max())
                per.setdefault(f"prec{k}", []).append(float(near.float().mean()))
                per.setdefault(f"modes{k}", []).append(float(len(set(d.argmin(1)[near].tolist()))))
                per.setdefault(f"l2_{k}", []).append(float(((x - st["z1"]) ** 2).sum(1).mean()))
        res[name] = per
    rows = []
    for name, per in res.items():
        prec = [f"{_ci(per[f'prec{k}'])} ({min(per[f'modes{k}']):.0f}/8)" for k in (1, 2, 4)]
        rows.append([name, _ci(per["S"]), *prec, _ci(per["l2_1"]), _ci(per["l2_2"])])
    table = markdown_table(["flow", "straightness S", "precision @1 (min modes)", "@2", "@4",
                            "1-step L2 to own ODE", "2-step L2"], rows)
    note = f"2-RF training: `fastgen train mixture-reflow` (3000 steps, 20000 pairs), {wall:.0f} s wall."
    return table + "\n\n" + note, res


# ------------------------------------------------------------------------------------------ digits


def _export_reflow(tr, card_extra: dict) -> None:
    """Ship the 2-RF EMA net as the zoo model ``digits-reflow`` (fp16 safetensors + JSON + card)."""
    from fastgen.models.zoo import export_model

    net_spec = dict(tr.cfg.network)
    fd = card_extra["fd"]
    card = f"""# digits-reflow: the 2-rectified digits flow (reflow of digits-flow)

`fastgen.models.load("digits-reflow")` returns a `RectifiedFlowDenoiser` (EDM contract `D(x, sigma,
class_labels)`); `.net(x_t, t, class_labels=...)` is the rectified-flow velocity (t = 0 noise, t = 1 data).
Sample it with few Euler steps uniform in t (`fastgen.train.reflow_pairs.rf_uniform_sigmas(k)` with
`fastgen.core.solvers.euler`, start `999 * noise`). Class-conditional only (trained without label dropout).

- Network: `ResidualMLP` {json.dumps(net_spec)}, weights float16 (EMA 0.999 with warm-up).
- Training: `fastgen/configs/train/digits-reflow.yaml`: 16000 couplings (noise, ODE endpoint) of `digits-flow`
  (Heun, 16 steps uniform in t, balanced labels, pair seed 0), fine-tuned from digits-flow's weights, 2000 steps,
  batch 256, AdamW lr 5e-4, seed 0; {card_extra['wall']:.0f} s wall (pairs + training) on a shared 2-core CPU.
- Exact command: `OMP_NUM_THREADS=1 python -m benchmarks.bench_reflow` (runs `fastgen train digits-reflow`
  and exports this model; the benchmark section "Reflow" in BENCHMARKS.md has the full numbers).

## FD_digits, Euler uniform in t (900 samples, 90 per class; mean over noise seeds 0, 1, 2)

| steps | digits-flow (1-RF) | digits-reflow (2-RF) |
|---|---|---|
""" + "".join(f"| {k} | {fd['1-RF'][k]:.3f} | {fd['2-RF'][k]:.3f} |\n" for k in STEPS) + f"""
Straightness S (normalised): 1-RF {card_extra['S']['1-RF']:.4f}, 2-RF {card_extra['S']['2-RF']:.4f}.
"""
    export_model(tr.ema_network(), "digits-reflow", network=net_spec, denoiser={"type": "flow"}, card=card,
                 weights_dir=card_extra.get("weights_dir"),
                 extra={"sample_shape": [1, 8, 8], "method": {"name": "reflow"},
                        "training": {"config": "configs/train/digits-reflow.yaml", "steps": tr.cfg.steps,
                                     "seed": tr.cfg.seed, "wall_s": card_extra["wall"]},
                        "fd_digits_euler": {str(k): fd["2-RF"][k] for k in STEPS},
                        "straightness_normalized": card_extra["S"]["2-RF"]})


def _digits_eval(den, steps: tuple[int, ...]) -> dict:
    from fastgen.metrics import digits_fd, digits_logits
    from fastgen.train.reflow_pairs import straightness

    labels = torch.arange(N_DIGITS) % 10
    per: dict[str, list[float]] = {}
    for seed in SEEDS:
        z0 = torch.randn(N_DIGITS, 1, 8, 8, generator=torch.Generator().manual_seed(1000 + seed))
        if len(steps) > 1:
            st = straightness(den, z0, steps=64, class_labels=labels)
            per.setdefault("S", []).append(st["S"])
            per.setdefault("S_norm", []).append(st["S_normalized"])
            per.setdefault("fd_ode", []).append(digits_fd(st["z1"].clamp(-1, 1)))
        for k in steps:
            x = euler_rf(den, z0, k, class_labels=labels).clamp(-1, 1)
            per.setdefault(f"fd{k}", []).append(digits_fd(x))
            per.setdefault(f"acc{k}", []).append(float((digits_logits(x).argmax(1) == labels).float().mean()))
            if len(steps) > 1:
                per.setdefault(f"l2_{k}", []).append(float(((x - st["z1"].clamp(-1, 1)) ** 2).flatten(1).sum(1).mean()))
    return per


def digits_section(runs: Path) -> tuple[str, dict]:
    from fastgen.models import load_model
    from fastgen.models.zoo import list_models

    flow = load_model("digits-flow").denoiser
    t0 = time.perf_counter()
    tr2, wall2 = train("digits-reflow", runs)
    two = tr2.method.sampling_denoiser(tr2.ema_network()).eval()
    res = {"1-RF": _digits_eval(flow, STEPS), "2-RF": _digits_eval(two, STEPS)}
    mean = {n: {k: sum(res[n][f"fd{k}"]) / len(SEEDS) for k in STEPS} for n in res}
    s_norm = {n: sum(res[n]["S_norm"]) / len(SEEDS) for n in res}
    wdir = str(runs / "quick-zoo") if QUICK else None
    _export_reflow(tr2, {"fd": mean, "S": s_norm, "wall": wall2, "weights_dir": wdir})
    assert "digits-reflow" in list_models(wdir)
    tr3, wall3 = train("digits-reflow-distill", runs)
    res["2-RF + distill"] = _digits_eval(tr3.method.sampling_denoiser(tr3.ema_network()).eval(), (1,))
    total = time.perf_counter() - t0
    rows = []
    for name, per in res.items():
        rows.append([name, _ci(per["S"]) if "S" in per else "—", _ci(per["S_norm"]) if "S_norm" in per else "—",
                     *[_ci(per[f"fd{k}"]) if f"fd{k}" in per else "— (1-step only)" for k in STEPS],
                     _ci(per["fd_ode"]) if "fd_ode" in per else "—"])
    table = markdown_table(["model", "straightness S", "S / E‖chord‖²", *[f"FD_digits @{k}" for k in STEPS],
                            "FD @64 (own ODE)"], rows)
    l2 = markdown_table(["model", *[f"L2 to own ODE @{k}" for k in STEPS]],
                        [[n, *[_ci(res[n][f"l2_{k}"]) for k in STEPS]] for n in ("1-RF", "2-RF")])
    cost = (f"Cost: 2-RF {wall2:.0f} s (16000 pairs with Heun-16 + 2000 steps), one-step distillation {wall3:.0f} s "
            f"(16000 pairs from the 2-RF + 1500 steps); {total:.0f} s in all, shared 2-core CPU, one thread.")
    return table + "\n\n" + l2 + "\n\n" + cost, res


def verdict(res_mix: dict, res_dig: dict) -> str:
    s1, s2 = _ci_tuple(res_dig["1-RF"]["S"]), _ci_tuple(res_dig["2-RF"]["S"])
    straighter = s2[2] < s1[1]
    better = {k: _ci_tuple(res_dig["2-RF"][f"fd{k}"])[2] < _ci_tuple(res_dig["1-RF"][f"fd{k}"])[1] for k in (1, 2)}
    mix_s = _ci_tuple(res_mix["2-RF (MLP)"]["S"])[2] < 0.1 * _ci_tuple(res_mix["1-RF (exact)"]["S"])[1]
    held = straighter and all(better.values()) and mix_s
    dist = _ci_tuple(res_dig["2-RF + distill"]["fd1"])
    return (f"**Claim held here: {'yes' if held else 'no'}.** Straightness fell on the ring mixture "
            f"(S < 0.1x of the exact 1-RF: {mix_s}) and on the digits (2-RF S interval below 1-RF's: {straighter}); "
            f"FD_digits at 1 and 2 Euler steps improved with disjoint intervals: {better[1]} / {better[2]}. "
            f"One-step student after distillation: FD_digits {dist[0]:.3f} [{dist[1]:.3f}, {dist[2]:.3f}] "
            f"(vs 2-RF at 1 step {_ci(res_dig['2-RF']['fd1'])}).")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny runs; writes no results, no zoo model")
    args = p.parse_args(argv)
    if args.quick:
        QUICK.extend(["steps=3", "method.num_pairs=64", "data.num_samples=64", "method.pair_steps=2"])
    torch.set_num_threads(1)
    runs = Path(args.runs)
    mix_table, res_mix = mixture_section(runs)
    dig_table, res_dig = digits_section(runs)
    if QUICK:
        print(verdict(res_mix, res_dig), mix_table, dig_table, sep="\n\n")
        return
    (RESULTS / "reflow.json").write_text(json.dumps({"mixture": res_mix, "digits": res_dig}, indent=1) + "\n")
    body = f"""**Claim** (rectified flow, Liu et al. 2023): reflow straightens the flow's paths, so few-step Euler
improves sharply; t = 0 distillation of the straightened flow gives a one-step generator (InstaFlow's recipe).
{verdict(res_mix, res_dig)}

Straightness S = mean over t of E‖(Z_1 - Z_0)/(1 - t_eps) - v(Z_t, t)‖² along the model's own Euler paths
(summed over dimensions; 0 iff one Euler step is exact). Euler steps are uniform in rectified-flow time from
t_eps = 1e-3. Intervals: 95% over noise seeds {list(SEEDS)} (one training run per model, seed 0).

### Ring mixture (8 modes, radius 3, std 0.15; {N_MIX} samples per seed)

{mix_table}

### Digits (FD_digits vs the test split; train/test FD = 1.122; {N_DIGITS} samples per seed, 90 per class)

{dig_table}

Not measured: InstaFlow on the `digits-sd`/`digits-sd3` pipelines (text-conditioned reflow) -- not built in this
session. The distilled student is valid for one Euler step only (card pitfall 4), so it has no multi-step or ODE
entries. Command: `OMP_NUM_THREADS=1 python -m benchmarks.bench_reflow`.
"""
    write_section("reflow", "Reflow: 2-rectified flow and one-step distillation (straightness, 1/2/4-step quality)",
                  body)
    print(body)


if __name__ == "__main__":
    main()
