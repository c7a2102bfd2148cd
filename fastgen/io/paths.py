"""One output-path check and atomic writes.

:func:`check_output_path` refuses an output that is an existing file where a folder is wanted (or
the reverse), or that lies under an existing file; :func:`check_inside` refuses a path that
escapes its base folder (``..``, absolute paths, symlinks out); :func:`atomic_write` writes to a
temporary file in the same folder and renames it, so a crash never leaves half a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def check_output_path(path: str | Path, name: str = "--out", kind: str = "file") -> Path:
    """Check that ``path`` can be written as a ``kind`` (``"file"`` or ``"folder"``); return it as a Path.

    Raises:
        ValueError: ``path`` (or one of its parents) is an existing file where a folder is needed, ``path`` is an
            existing folder where a file is needed, or ``path`` is a symlink loop.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    p = Path(path)
    try:
        p.resolve(strict=False)
    except (RuntimeError, OSError) as err:  # symlink loops: RuntimeError (<3.13) or OSError
        raise ValueError(f"{name} {str(path)!r} cannot be resolved ({err})") from None
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{name} {str(path)!r} lies under {str(parent)!r}, which is a file, not a folder")
    if kind == "folder" and p.exists() and not p.is_dir():
        raise ValueError(f"{name} {str(path)!r} is an existing file; a folder is needed")
    if kind == "file" and p.is_dir():
        raise ValueError(f"{name} {str(path)!r} is an existing folder; a file path is needed")
    return p


def check_inside(path: str | Path, base: str | Path, name: str = "--export") -> Path:
    """Resolve ``path`` (relative to ``base`` when not absolute) and require it to lie inside ``base``.

    Raises:
        ValueError: the resolved path escapes ``base`` (``..``, an absolute path elsewhere, a symlink out) or
            cannot be resolved (symlink loop).
    """
    base_r = Path(base).resolve()
    p = Path(path)
    try:
        full = (p if p.is_absolute() else base_r / p).resolve()
    except (RuntimeError, OSError) as err:
        raise ValueError(f"{name} {str(path)!r} cannot be resolved ({err})") from None
    if full != base_r and base_r not in full.parents:
        raise ValueError(f"{name} {str(path)!r} resolves to {str(full)!r}, outside {str(base_r)!r}")
    return full


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it onto ``path`` (on error remove it)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    p = check_output_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # a plain open (not mkstemp, whose files are 0600) so the result gets the usual umask permissions
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
