"""One JSON/YAML reader that names the file on every failure.

:func:`read_json` and :func:`read_yaml` (and :func:`read_config`, by suffix) raise
``FileNotFoundError`` for a missing path and ``ValueError`` naming the file and the argument for
everything else: a folder, a symlink loop, binary (non-UTF-8) bytes, a syntax error (with line),
an empty document, or a top level of the wrong type (``expect=dict`` by default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Refuse files larger than this (a config or schedule is a few kB).
MAX_TEXT_BYTES = 64 * 1024 * 1024


def read_text(path: str | Path, name: str = "file") -> str:
    """UTF-8 text of ``path``. Raises FileNotFoundError (missing) or ValueError (folder, loop, binary, huge)."""
    p = Path(path)
    try:
        if not p.exists():
            if p.is_symlink():
                raise ValueError(f"{name} {str(path)!r} is a dangling symlink or a symlink loop")
            raise FileNotFoundError(f"{name} {str(path)!r}: file not found")
        if p.is_dir():
            raise ValueError(f"{name} {str(path)!r} is a folder, not a file")
        size = p.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise ValueError(f"{name} {str(path)!r} is {size} bytes; a text config is at most {MAX_TEXT_BYTES}")
        data = p.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:  # symlink loops, permissions
        raise ValueError(f"{name} {str(path)!r} cannot be read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{name} {str(path)!r} is not UTF-8 text (binary byte at offset {err.start}); expected JSON or YAML"
        ) from None


def _check_top(obj: Any, path: str | Path, name: str, expect: type | None, what: str) -> Any:
    if expect is not None and not isinstance(obj, expect):
        got = "empty" if obj is None else f"a {type(obj).__name__}"
        raise ValueError(f"{name} {str(path)!r}: the top level of the {what} must be a {expect.__name__}, got {got}")
    return obj


def read_json(path: str | Path, name: str = "file", expect: type | None = dict) -> Any:
    """Parse ``path`` as JSON; the top level must be ``expect`` (None: anything)."""
    text = read_text(path, name)
    if not text.strip():
        raise ValueError(f"{name} {str(path)!r} is empty; expected a JSON {getattr(expect, '__name__', 'value')}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} {str(path)!r} is not valid JSON (line {err.lineno}: {err.msg})") from None
    return _check_top(obj, path, name, expect, "JSON")


def read_yaml(path: str | Path, name: str = "file", expect: type | None = dict) -> Any:
    """Parse ``path`` with ``yaml.safe_load`` (no Python tags); the top level must be ``expect``."""
    import yaml

    text = read_text(path, name)
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{name} {str(path)!r} is not valid YAML ({where}{problem})") from None
    if obj is None:
        raise ValueError(f"{name} {str(path)!r} is empty; expected a YAML mapping")
    return _check_top(obj, path, name, expect, "YAML")


def read_config(path: str | Path, name: str = "--config", expect: type | None = dict) -> Any:
    """JSON for ``.json`` files, YAML otherwise (YAML is a superset of JSON)."""
    if Path(path).suffix.lower() == ".json":
        return read_json(path, name, expect)
    return read_yaml(path, name, expect)
