"""Docs that run (issue 14): every Python block and CLI line of README.md and docs/*.md is executed, in order.

The exact rule:

- A fence is a line whose text, after leading spaces, starts with three backticks; the first word after the
  backticks is the block's language; the next such line with nothing after the backticks closes it.
  Indented (4-space) code blocks and fences of any other language (``yaml``, ``text``, none) are not run.
- ``python`` / ``py`` blocks run with ``exec``; the Python blocks of one file share one namespace (like a
  notebook), in file order, interleaved with the file's CLI lines.
- ``bash`` / ``sh`` / ``shell`` / ``console`` blocks: each logical line (a trailing backslash joins the next
  line; in ``console`` blocks only lines starting with ``$ `` are commands, the rest is output) is split with
  ``shlex`` (``#`` comments dropped) and leading ``NAME=value`` assignments are applied to its environment.
  It RUNS when its first word is ``fastgen``, ``python`` or ``python3`` (so ``python -m fastgen ...`` too):
  ``fastgen ARGS`` and ``python -m fastgen ARGS`` / ``python -m fastgen.cli ARGS`` call
  ``fastgen.cli.main(ARGS)`` (the console script's function) in the file's process and must return 0;
  any other ``python ...`` line runs as a subprocess with the same interpreter and must exit 0.
  Every other line is NOT run: ``pip install``, ``make``, ``git``, ``torchrun``, ``accelerate launch``,
  ``cd``, ``.venv/bin/...`` and anything else.
- ``<!-- docs-harness: skip (REASON) -->`` on the line directly above a fence: the block is not run and is
  reported as a pytest skip with REASON (``test_doc_skipped_block``). A marker without a reason, or one
  that is not directly above a fence, fails the file's test.
- Each file runs in its own Python process (registrations cannot leak between files or into the test
  session), in a fresh temporary working directory, offline (``HF_HUB_OFFLINE=1``), one thread, with a
  limit of ``CPU_LIMIT_S`` CPU seconds per file (``RLIMIT_CPU``, so a loaded machine does not make a docs
  example fail) and a wall-clock backstop of ``TIMEOUT_S``. A failure names the file, the block's first line
  and the traceback; the blocks after a failing one are not run (they usually depend on it).

Docs examples use the zoo (``digits-*``, mixtures) and the shipped pipelines (``digits-sd``, ``digits-sd3``)
at small ``--num``/``--nfe``, so the whole harness takes well under two minutes on two CPU cores.

Run one file by hand: ``python tests/test_docs.py docs/schedules.md`` (prints each block as it runs).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Per file: CPU seconds of its process (RLIMIT_CPU: independent of how loaded the machine is; each file
# needs a few to ~20 CPU seconds) and a wall-clock backstop for a block that hangs without computing.
CPU_LIMIT_S = 90
TIMEOUT_S = 600
RUN_LANGS = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell",
             "console": "console"}
CLI_WORDS = ("fastgen", "python", "python3")
MARKER = re.compile(r"^\s*<!--\s*docs-harness:\s*skip\b(.*?)-->\s*$")
REASON = re.compile(r"^\s*\((.*\S.*)\)\s*$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)")


@dataclass
class Block:
    """One runnable unit: a Python block or one CLI line. ``line`` is 1-based in ``path``."""

    path: str
    line: int
    kind: str  # "python" | "cli" | "skip"
    text: str  # code, the CLI line, or the skip reason


def doc_files() -> list[Path]:
    """README.md and docs/*.md, sorted."""
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _shell_lines(body: list[str], start: int, console: bool) -> list[tuple[int, str]]:
    """Logical command lines ``(line, text)`` of a shell block whose first body line is ``start``."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for i, raw in enumerate(body):
        text = raw.strip()
        if not pending:
            if console:
                if not text.startswith("$ "):
                    continue
                text = text[2:].strip()
            first = start + i
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        full = (pending + text).strip()
        pending = ""
        if full and not full.startswith("#"):
            out.append((first, full))
    if pending.strip():
        out.append((first, pending.strip()))
    return out


def runs_cli(line: str) -> bool:
    """True when a shell line is run by the harness (first word after ``NAME=value``s is in ``CLI_WORDS``)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return False
    words = [w for w in words if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w)] if words else []
    return bool(words) and words[0] in CLI_WORDS


def parse(path: Path) -> list[Block]:
    """The blocks of one Markdown file in order; ``ValueError`` for a malformed skip marker."""
    lines = path.read_text().splitlines()
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            reason = REASON.match(m.group(1))
            if reason is None:
                raise ValueError(f"{rel}:{i + 1}: a docs-harness skip marker needs a reason: "
                                 "<!-- docs-harness: skip (why this block cannot run) -->")
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
                raise ValueError(f"{rel}:{i + 1}: a docs-harness skip marker must be on the line directly "
                                 "above a ``` fence")
        f = FENCE.match(lines[i])
        if not f:
            i += 1
            continue
        lang = f.group(2).lower()
        j = i + 1
        while j < len(lines) and not re.fullmatch(r"\s*```\s*", lines[j]):
            j += 1
        indent = len(f.group(1))
        body = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[i + 1 : j]]
        skip = MARKER.match(lines[i - 1]) if i > 0 else None
        kind = RUN_LANGS.get(lang)
        if skip and kind:
            blocks.append(Block(rel, i + 1, "skip", REASON.match(skip.group(1)).group(1).strip()))
        elif kind == "python":
            blocks.append(Block(rel, i + 1, "python", "\n".join(body)))
        elif kind is not None:
            for line, text in _shell_lines(body, i + 2, console=(kind == "console")):
                if runs_cli(text):
                    blocks.append(Block(rel, line, "cli", text))
        i = j + 1
    return blocks


# ------------------------------------------------------------------------------------------ the child


def _run_cli(line: str, env: dict[str, str]) -> None:
    words = shlex.split(line, comments=True)
    assigns = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        assigns[k] = v
    if words[0] == "fastgen":
        argv = words[1:]
    elif len(words) >= 3 and words[1] == "-m" and words[2] in ("fastgen", "fastgen.cli"):
        argv = words[3:]
    else:
        proc = subprocess.run([sys.executable, *words[1:]], env={**env, **assigns}, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"exit code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(proc.stdout[-2000:], end="")
        return
    from fastgen.cli import main

    old = {k: os.environ.get(k) for k in assigns}
    os.environ.update(assigns)
    try:
        rc = main(argv)
    except SystemExit as err:  # argparse
        rc = err.code if isinstance(err.code, int) else 2
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if rc != 0:
        raise RuntimeError(f"fastgen exited with {rc} (its error is printed above)")


def run_file(path: Path, report: Path) -> int:
    """Run every non-skipped block of ``path`` in the current directory; write ``report`` (JSON)."""
    blocks = [b for b in parse(path) if b.kind != "skip"]
    namespace: dict = {"__name__": "__docs__"}
    results = []
    for b in blocks:
        t0 = time.perf_counter()
        print(f"--- {b.path}:{b.line} ({b.kind})", flush=True)
        try:
            if b.kind == "python":
                code = compile("\n" * b.line + b.text, str(ROOT / b.path), "exec")
                exec(code, namespace)  # noqa: S102 - the project's own documentation
            else:
                _run_cli(b.text, dict(os.environ))
        except BaseException as err:  # noqa: BLE001 - reported with the traceback, then stop
            results.append({**asdict(b), "ok": False, "seconds": time.perf_counter() - t0,
                            "error": "".join(traceback.format_exception(err))[-6000:]})
            break
        results.append({**asdict(b), "ok": True, "seconds": time.perf_counter() - t0})
    report.write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


# ------------------------------------------------------------------------------------------ the tests

try:
    import pytest
except ImportError:  # run as a script without pytest
    pytest = None


def _skipped() -> list[tuple[str, str]]:
    out = []
    for p in doc_files():
        try:
            out += [(f"{b.path}:{b.line}", b.text) for b in parse(p) if b.kind == "skip"]
        except ValueError:
            pass  # reported by test_doc_file
    return out


def _cpu_limit() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S + 5))


if pytest is not None:

    @pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
    def test_doc_file(path: Path, tmp_path: Path) -> None:
        blocks = parse(path)  # a malformed marker raises here, naming the file and line
        runnable = [b for b in blocks if b.kind != "skip"]
        if not runnable:
            pytest.skip(f"{path.name}: no runnable block ({len(blocks)} skipped)")
        work, report = tmp_path / "work", tmp_path / "report.json"
        work.mkdir()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path), "--report",
                                   str(report)], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT_S, preexec_fn=_cpu_limit)
        except subprocess.TimeoutExpired as err:
            out = (err.stdout or b"")[-3000:]
            out = out.decode() if isinstance(out, bytes) else out
            last = [ln for ln in out.splitlines() if ln.startswith("--- ")][-1:]
            pytest.fail(f"{path.name}: over the {TIMEOUT_S} s wall-clock backstop, last block started: {last}\n{out}")
        if proc.returncode in (-9, -24, 128 + 24, 128 + 9):  # SIGXCPU / SIGKILL from RLIMIT_CPU
            last = [ln for ln in proc.stdout.splitlines() if ln.startswith("--- ")][-1:]
            pytest.fail(f"{path.name}: over the {CPU_LIMIT_S} CPU-second budget, last block started: {last}")
        results = json.loads(report.read_text()) if report.is_file() else []
        bad = [r for r in results if not r["ok"]]
        if bad or proc.returncode != 0:
            where = f"{bad[0]['path']}:{bad[0]['line']} ({bad[0]['kind']} block)" if bad else path.name
            detail = bad[0]["error"] if bad else proc.stderr[-4000:]
            pytest.fail(f"{where} failed:\n{detail}\n--- output ---\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        assert [r["line"] for r in results] == [b.line for b in runnable]

    @pytest.mark.parametrize("where,reason", _skipped() or [("none", "")], ids=lambda v: str(v))
    def test_doc_skipped_block(where: str, reason: str) -> None:
        if where == "none":
            pytest.skip("no block is marked skip")
        pytest.skip(f"{where}: {reason}")

    def test_parser_rules(tmp_path: Path) -> None:
        doc = tmp_path / "x.md"
        doc.write_text("\n".join([
            "```python", "a = 1", "```",                                    # 1-3
            "```bash", "pip install fastgen-diffusion", "fastgen sample \\", "  --num 2  # two",
            "make demo", "OMP_NUM_THREADS=1 python -m fastgen demo", "torchrun -m fastgen.cli train x",
            "accelerate launch -m fastgen.cli train x", "git clone x", "```",  # 4-13
            "<!-- docs-harness: skip (needs a GPU) -->", "```python", "import cuda", "```",  # 14-17
            "```console", "$ fastgen schedule show a.json", "sigmas: [1, 0]", "```",  # 18-21
            "```yaml", "fastgen: 1", "```",                                   # 22-24
            "    fastgen sample --indented", ""]))
        got = [(b.line, b.kind, b.text) for b in parse(doc)]
        assert got == [(1, "python", "a = 1"), (6, "cli", "fastgen sample  --num 2  # two"),
                       (9, "cli", "OMP_NUM_THREADS=1 python -m fastgen demo"), (15, "skip", "needs a GPU"),
                       (19, "cli", "fastgen schedule show a.json")]
        for bad in ("<!-- docs-harness: skip -->", "<!-- docs-harness: skip () -->"):
            doc.write_text(f"{bad}\n```python\npass\n```\n")
            with pytest.raises(ValueError, match="needs a reason"):
                parse(doc)
        doc.write_text("<!-- docs-harness: skip (gpu) -->\n\n```python\npass\n```\n")
        with pytest.raises(ValueError, match="directly above"):
            parse(doc)

    def test_failure_names_the_block_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        doc = tmp_path / "y.md"
        doc.write_text("text\n```python\nx = 2\n```\n\n```python\nassert x == 3, 'x is 2'\n```\n")
        monkeypatch.chdir(tmp_path)
        report = tmp_path / "r.json"
        assert run_file(doc, report) == 1
        res = json.loads(report.read_text())
        assert [r["ok"] for r in res] == [True, False] and res[1]["line"] == 6
        assert "x is 2" in res[1]["error"] and f"{doc}\", line 7" in res[1]["error"]
        # CLI lines: `fastgen ...` in process (argparse's exit 0 is success), other `python ...` as a subprocess
        # with the line's NAME=value environment; a non-zero exit names its code.
        doc.write_text("```console\n$ fastgen --version\nfastgen 0.x\n"
                       "$ CODE=3 python -c 'import os, sys; sys.exit(int(os.environ[\"CODE\"]))'\n```\n")
        assert run_file(doc, report) == 1
        res = json.loads(report.read_text())
        assert [(r["line"], r["ok"]) for r in res] == [(2, True), (4, False)] and "exit code 3" in res[1]["error"]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="run one Markdown file's blocks in the current directory")
    ap.add_argument("file")
    ap.add_argument("--report", default=None, help="JSON report path (default: a temporary file)")
    a = ap.parse_args()
    target = Path(a.file).resolve()
    rep = Path(a.report) if a.report else Path(tempfile.mkstemp(suffix=".json")[1])
    if a.report is None:  # by hand: run in a fresh temporary directory like the test does
        os.chdir(tempfile.mkdtemp(prefix="fastgen-docs-"))
    code = run_file(target, rep)
    for r in json.loads(rep.read_text()):
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['path']}:{r['line']} {r['kind']} {r['seconds']:.1f}s")
        if not r["ok"]:
            print(r["error"])
    sys.exit(code)
