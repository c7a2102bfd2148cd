"""Shortcut models vs flow matching, GFT vs CFG, and ICG/TSG vs CFG on the 8x8 digits (FD_digits).

1. ``digits-shortcut`` at 1, 2, 4, 8 (and 128) steps vs flow matching sampled with Euler at the same
   steps: the shortcut network's own flow-matching head (d = 1/128 at every step) and, when the zoo has
   it, the separately trained ``digits-flow`` model.
2. ``digits-gft`` at beta = 1/w (one pass per step) vs CFG at w on the teacher it was fine-tuned from
   (two passes per step), same sampler (Heun, Karras schedule), network calls counted.
3. ICG (random class) and TSG (time-embedding noise, s = 1, alpha = 0) vs CFG vs no guidance on the same
   teacher: FD_digits and the classifier's mean probability of the requested class.

The teacher is ``digits-edm`` from the zoo, or any ``load_model`` source (e.g. a training run's checkpoint)
named by the environment variable ``FASTGEN_GFT_BASE`` (the teacher GFT was fine-tuned from, when that differs).
Writes ``benchmarks/results/shortcut_gft.md`` and two PNGs.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from benchmarks.common import RESULTS, markdown_table, write_section

N = 900  # 90 per class, as the FD calibration in docs/metrics.md
STEPS = (1, 2, 4, 8, 128)
WS = (1.5, 2.0, 3.0)


class Counter(nn.Module):
    """Counts calls of a denoiser (each call = one network evaluation of the batch)."""

    def __init__(self, den: nn.Module) -> None:
        super().__init__()
        self.den = den
        self.calls = 0

    def forward(self, *a, **k):
        self.calls += 1
        return self.den(*a, **k)


def _noise(shape=(N, 1, 8, 8), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _labels() -> torch.Tensor:
    return torch.arange(N) % 10


def _fd(x: torch.Tensor) -> float:
    from fastgen.metrics import digits_fd

    return digits_fd(x.clamp(-1, 1))


def _acc(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean classifier probability of the requested class (accuracy saturates at 1.000 here)."""
    from fastgen.metrics import digits_logits

    p = torch.softmax(digits_logits(x.clamp(-1, 1)).double(), dim=1)
    return float(p.gather(1, y.reshape(-1, 1)).mean())


def shortcut_section() -> tuple[str, dict]:
    from fastgen.data import load_digits_split
    from fastgen.models import load
    from fastgen.models.zoo import list_models, model_info
    from fastgen.samplers.shortcut import shortcut_sample

    sc = load("digits-shortcut").model
    y, noise = _labels(), _noise()
    fm_head = lambda x, t, d, **c: sc(x, t, torch.full_like(d, 1 / sc.max_steps), **c)  # noqa: E731
    baselines = {"FM head of the shortcut net (d = 1/128), Euler": fm_head}
    if "digits-flow" in list_models():
        flow = load("digits-flow")
        baselines["digits-flow (separate FM model), Euler"] = lambda x, t, d, **c: flow.net(x, t, **c)  # noqa: E731
    res: dict[str, list[float]] = {"shortcut": []}
    res.update({k: [] for k in baselines})
    with torch.no_grad():
        for n in STEPS:
            res["shortcut"].append(_fd(shortcut_sample(sc, noise, n, class_labels=y)))
            for k, m in baselines.items():
                res[k].append(_fd(shortcut_sample(m, noise, n, class_labels=y)))
    info = model_info("digits-shortcut")
    rows = [[k] + v for k, v in res.items()]
    md = (
        f"`digits-shortcut` ({info.get('steps')} training steps, config `{info.get('config')}`) sampled with "
        f"`shortcut_sample` (d = 1/n) vs flow matching sampled with Euler in t at the same n (NFE = n). "
        f"{N} samples (90 per class), FD_digits against the held-out test digits (the train digits score "
        f"{_fd(load_digits_split('train').images):.3f}).\n\n"
        + markdown_table(["model / sampler"] + [f"{n} steps" for n in STEPS], rows)
    )
    return md, res


def _teacher() -> tuple[nn.Module, str]:
    from fastgen.models import load_model

    source = os.environ.get("FASTGEN_GFT_BASE", "digits-edm")
    return load_model(source).denoiser, f"`{source}`"


def _heun(den: nn.Module, steps: int = 16) -> torch.Tensor:
    from fastgen.core.schedules import karras
    from fastgen.core.solvers import heun

    sig = karras(steps, 0.002, 80.0)
    with torch.no_grad():
        return heun(den, _noise() * sig[0], sig, class_labels=_labels())


def guidance_section() -> tuple[str, dict]:
    from fastgen.models import load
    from fastgen.samplers.guidance import cfg, gft, icg, tsg

    teacher, tname = _teacher()
    gft_den = load("digits-gft")
    y = _labels()
    null = {"class_labels": torch.tensor(10)}
    rows, grows = [], []
    curves: dict[str, list[float]] = {"CFG": [], "GFT": [], "ICG": [], "TSG": []}
    c = Counter(teacher)
    x = _heun(c)
    fd_none, acc_none, calls_none = _fd(x), _acc(x, y), c.calls
    rows.append(["none (w = 1)", "-", f"{fd_none:.3f}", f"{acc_none:.3f}", calls_none])
    for w in WS:
        c_cfg, c_gft = Counter(teacher), Counter(gft_den)
        x_cfg = _heun(cfg(c_cfg, w, uncond=null))
        x_gft = _heun(gft(c_gft, w))
        fd_cfg, fd_gft = _fd(x_cfg), _fd(x_gft)
        curves["CFG"].append(fd_cfg)
        curves["GFT"].append(fd_gft)
        grows.append([w, f"{fd_cfg:.3f}", c_cfg.calls, f"{fd_gft:.3f}", c_gft.calls, f"{fd_gft / fd_cfg:.2f}",
                      f"{_acc(x_cfg, y):.3f}", f"{_acc(x_gft, y):.3f}"])
        rows.append(["CFG", w, f"{fd_cfg:.3f}", f"{_acc(x_cfg, y):.3f}", c_cfg.calls])
        c_i = Counter(teacher)
        x_i = _heun(icg(c_i, w, 10, generator=torch.Generator().manual_seed(1)))
        curves["ICG"].append(_fd(x_i))
        rows.append(["ICG (random class)", w, f"{curves['ICG'][-1]:.3f}", f"{_acc(x_i, y):.3f}", c_i.calls])
        c_t = Counter(teacher)
        x_t = _heun(tsg(c_t, w, scale=1.0, alpha=0.0, generator=torch.Generator().manual_seed(1)))
        curves["TSG"].append(_fd(x_t))
        rows.append(["TSG (s = 1, alpha = 0)", w, f"{curves['TSG'][-1]:.3f}", f"{_acc(x_t, y):.3f}", c_t.calls])
    md = (
        f"### GFT at beta = 1/w vs CFG at w\n\nCFG on {tname}; `digits-gft` fine-tuned from it. Heun, Karras "
        f"schedule, 16 steps (31 denoiser evaluations), {N} samples; network calls counted (batched passes).\n\n"
        + markdown_table(["w", "FD CFG", "calls CFG", "FD GFT", "calls GFT", "FD GFT / FD CFG",
                          "p(class) CFG", "p(class) GFT"], grows)
        + "\n\nClaim \"GFT's FD within 10% of CFG's (no worse than 1.10x) at half the network calls\": "
        + ", ".join(f"w = {w:g}: {'yes' if g / c <= 1.10 else 'no'} ({g / c:.2f})"
                    for w, c, g in zip(WS, curves["CFG"], curves["GFT"]))
        + f"; network calls halved at every w: {all(r[2] == 2 * r[4] for r in grows)}."
        + f"\n\n### ICG / TSG vs CFG vs no guidance ({tname}, same sampler)\n\np(class) = the digits "
        "classifier's mean probability of the requested class (its top-1 accuracy is 1.000 for every row).\n\n"
        + markdown_table(["guidance", "w", "FD_digits", "p(class)", "network calls"], rows)
    )
    return md, {"fd_none": fd_none, **curves}


def _plot(sc: dict, gd: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return []
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, v in sc.items():
        ax.plot(STEPS, v, marker="o", label=k)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylabel("FD_digits (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "shortcut_gft_steps.png", dpi=120)
    out.append("shortcut_gft_steps.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in ("CFG", "GFT", "ICG", "TSG"):
        ax.plot(WS, gd[k], marker="o", label=k)
    ax.axhline(gd["fd_none"], color="gray", ls="--", label="no guidance")
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("FD_digits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "shortcut_gft_guidance.png", dpi=120)
    out.append("shortcut_gft_guidance.png")
    plt.close("all")
    return out


def main() -> None:
    t0 = time.perf_counter()
    sc_md, sc = shortcut_section()
    gd_md, gd = guidance_section()
    pngs = _plot(sc, gd)
    body = (
        "### Shortcut vs flow matching\n\n" + sc_md + "\n\n" + gd_md
        + "\n\n" + "\n".join(f"![{p}]({p})" for p in pngs)
        + f"\n\n_Benchmark wall time: {time.perf_counter() - t0:.0f} s._\n"
    )
    print(write_section("shortcut_gft", "Shortcut models, GFT and guidance variants (digits)", body))


if __name__ == "__main__":
    main()
