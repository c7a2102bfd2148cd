"""The dependency direction of DESIGN.md, read from the source with ``ast``:

    core  <-  io, models, data  <-  samplers, train, metrics  <-  distill  <-  commands, cli

Every import of a ``fastgen`` module (top level or inside a function, ``import x``, ``from x import y``,
``from fastgen import sub``, and string arguments of ``importlib.import_module``/``__import__``) is an
edge; an edge from a lower tier to a higher one fails. Imports within one tier are allowed; ``core``
imports nothing of fastgen outside ``core``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fastgen"

TIERS: dict[str, int] = {
    "core": 0,
    "io": 1, "models": 1, "data": 1,
    "samplers": 2, "train": 2, "metrics": 2,
    "distill": 3,
    "commands": 4, "cli": 4,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _tier(module: str) -> int | None:
    """The tier of a ``fastgen...`` module name; ``fastgen`` itself (``__version__``) is tier 0."""
    parts = module.split(".")
    if parts[0] != "fastgen":
        return None
    if len(parts) == 1:
        return 0
    if parts[1] not in TIERS:
        raise AssertionError(f"fastgen.{parts[1]} is in no tier of DESIGN.md; add it to TIERS")
    return TIERS[parts[1]]


def _string_prefix(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def _is_dynamic_import(call: ast.Call) -> bool:
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__")
    )


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in the file; dynamic imports with a string prefix."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "fastgen":
                out += [(node.lineno, f"fastgen.{a.name}" if a.name in TIERS else "fastgen") for a in node.names]
            else:
                out.append((node.lineno, base))
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            prefix = _string_prefix(node.args[0]) if node.args else None
            if prefix is None:
                out.append((node.lineno, "<non-literal import_module argument>"))
            else:
                out.append((node.lineno, prefix.rstrip(".")))
    return out


def _edges() -> list[tuple[str, int, str]]:
    return [(_module_name(p), line, mod) for p in sorted(PKG.rglob("*.py")) for line, mod in _imports(p)]


def test_every_fastgen_module_is_in_a_tier():
    for p in PKG.rglob("*.py"):
        _tier(_module_name(p))


def test_no_import_against_the_direction():
    bad = []
    for me, line, mod in _edges():
        if mod.startswith("<"):
            bad.append(f"{me}:{line} {mod} (a module path computed at run time)")
            continue
        to = _tier(mod)
        if to is None:
            continue
        frm = _tier(me)
        if to > frm:
            bad.append(f"{me}:{line} imports {mod} (tier {frm} -> tier {to})")
    assert not bad, "imports against core <- io, models, data <- samplers, train, metrics <- distill <- " \
        "commands, cli:\n" + "\n".join(bad)


def test_core_imports_nothing_of_fastgen_outside_core():
    bad = [
        f"{me}:{line} imports {mod}"
        for me, line, mod in _edges()
        if me.startswith("fastgen.core") and mod.startswith("fastgen") and not mod.startswith("fastgen.core")
    ]
    assert not bad, "\n".join(bad)


def test_dynamic_imports_name_fastgen_modules_only():
    """``import_module`` is only used with a literal ``fastgen.`` prefix (the CLI's subcommands): nothing
    read from a file is ever turned into an import."""
    dyn = [(me, mod) for me, line, mod in _edges() if mod.startswith("<")]
    assert not dyn
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and _is_dynamic_import(node):
                prefix = _string_prefix(node.args[0]) if node.args else None
                assert prefix is not None and prefix.startswith("fastgen."), f"{p}:{node.lineno}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from fastgen.distill import student\n", ["fastgen.distill"]),
        ("from fastgen import distill\n", ["fastgen.distill"]),
        ("def f():\n    import fastgen.train.checkpoint\n", ["fastgen.train.checkpoint"]),
        ("import importlib\nimportlib.import_module('fastgen.distill.x')\n", ["importlib", "fastgen.distill.x"]),
        ("import importlib\nimportlib.import_module(f'fastgen.commands.{n}')\n", ["importlib", "fastgen.commands"]),
        ("importlib.import_module(name)\n", ["<non-literal import_module argument>"]),
        ("from . import zoo\n", ["fastgen.models"]),
        ("from ..distill import student\n", ["fastgen.distill"]),
    ],
)
def test_the_reader_sees_every_form(tmp_path, monkeypatch, source, expected):
    """The reader itself: each import form is an edge (so the direction test cannot pass by not seeing)."""
    fake = tmp_path / "fastgen" / "models" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    monkeypatch.setitem(globals(), "PKG", tmp_path / "fastgen")
    assert [m for _, m in _imports(fake)] == expected
