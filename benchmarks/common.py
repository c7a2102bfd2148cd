"""Shared plumbing for benchmark scripts: machine/version header, result sections, BENCHMARKS.md.

Each ``benchmarks/bench_<name>.py`` measures one question and calls :func:`write_section` with a
markdown body (tables) and optionally saves PNG plots under ``benchmarks/results/``.
:func:`assemble` concatenates every section into ``BENCHMARKS.md`` at the repository root, so every
number there comes from a script here.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine_info() -> str:
    """One line naming the machine, versions and date."""
    import torch

    try:
        import diffusers

        dv = diffusers.__version__
    except ImportError:  # the GPU machine may not have it
        dv = "not installed"
    import torchmetrics

    device = "CPU"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    return (
        f"{device}; {os.cpu_count()} CPU cores ({cpu}); torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}); diffusers {dv}; torchmetrics {torchmetrics.__version__}; "
        f"python {platform.python_version()}; {_dt.date.today().isoformat()}"
    )


def write_section(name: str, title: str, body: str, script: str | None = None) -> Path:
    """Write ``benchmarks/results/<name>.md`` with a title, the machine line and ``body``.

    ``script``: the benchmark's module name when it is not ``bench_<name>`` (one script, several sections).
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    script = script or f"bench_{name}"
    text = f"## {title}\n\n_Machine: {machine_info()}_  \n_Script: `benchmarks/{script}.py`_\n\n{body.strip()}\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    assemble()
    return path


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; floats are printed with 4 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def assemble() -> Path:
    """Rebuild BENCHMARKS.md from every section in benchmarks/results/ (sorted by name).

    A section is a ``.md`` file that :func:`write_section` wrote (it opens with ``## ``); other Markdown
    there (hand-written notes that a section includes, such as ``fdistill_ablations_notes.md``) is not a
    section of its own and would otherwise appear twice."""
    parts = [
        "# fastgen benchmarks\n",
        "Every number below is written by a script in `benchmarks/` (`make bench` runs them all). "
        "Each section names the machine, versions and date it was measured on.\n",
    ]
    for sec in sorted(RESULTS.glob("*.md")):
        text = sec.read_text()
        if not text.startswith("## "):
            continue
        # images named relative to benchmarks/results/ are re-pointed for BENCHMARKS.md at the root
        parts.append(re.sub(r"\]\(([^/()]+\.png)\)", r"](benchmarks/results/\1)", text))
    out = ROOT / "BENCHMARKS.md"
    out.write_text("\n".join(parts))
    return out
