"""Run every ``benchmarks/bench_*.py`` (``make bench``) and rebuild BENCHMARKS.md."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from benchmarks.common import assemble


def main() -> int:
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        try:
            importlib.import_module(f"benchmarks.{name}").main()
        except Exception as err:  # keep going; report at the end
            print(f"   {name} failed: {err!r}", flush=True)
            failed.append(name)
    assemble()
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
