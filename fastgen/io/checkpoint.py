"""Checkpoints: ``safetensors`` files plus a JSON state, written atomically; nothing is unpickled.

Layout of one checkpoint directory ``<output_dir>/checkpoints/step_00001234/``:

- ``tensors.safetensors``: every tensor, under prefixed names (``net/<network>.<param>``,
  ``ema/<network>.<key>``, ``method/<key>``, ``optim/<optimizer>/<param index>/<state key>``);
- ``state.json``: ``{"format": 1, "step", "data": {...}, "optim": {name: {"param_groups", "scalars"}},
  "config": {...}, "sha256": {file: digest}}``.

The directory is written under a temporary name and moved into place with ``os.replace``; then the
``latest`` file (also replaced atomically) names it. A half-written checkpoint is therefore never seen.
:func:`read_checkpoint` verifies the digest and raises ``ValueError`` naming the file when a checkpoint
is corrupt or incomplete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastgen.io.hashing import file_sha256
from fastgen.io.paths import atomic_write

__all__ = [
    "write_checkpoint",
    "read_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
    "optimizer_to_flat",
    "optimizer_from_flat",
    "checkpoint_dir_name",
    "remove_stale_temporaries",
    "tensors_finite",
]

FORMAT = 1
TENSORS = "tensors.safetensors"
STATE = "state.json"
LATEST = "latest"


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able metadata."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}/{idx}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    meta = {"param_groups": sd["param_groups"], "scalars": scalars, "indices": [int(i) for i in sd["state"]]}
    return tensors, meta


def optimizer_from_flat(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str
) -> None:
    """Inverse of :func:`optimizer_to_flat`: load the state into ``opt``."""
    state: dict[int, dict[str, Any]] = {int(i): {} for i in meta["indices"]}
    for key, v in tensors.items():
        if key.startswith(prefix + "/"):
            _, idx, k = key.rsplit("/", 2)
            state[int(idx)][k] = v
    for idx, sc in meta["scalars"].items():
        state[int(idx)].update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(
    root: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> Path:
    """Atomically write ``root/step_XXXXXXXX`` and point ``root/latest`` at it; returns the directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    state = dict(state, format=FORMAT, step=int(step), sha256={TENSORS: file_sha256(tmp / TENSORS)})
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    if final.exists():
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    with atomic_write(root / LATEST, "w") as f:
        f.write(final.name + "\n")
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint directory named by ``root/latest``, or ``None`` when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise ValueError(f"checkpoint pointer {str(pointer)!r} names {path.name!r}, which does not exist")
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, state)`` from a checkpoint directory, verifying format and digest."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {str(path)!r}")
    tfile, sfile = path / TENSORS, path / STATE
    for f in (tfile, sfile):
        if not f.is_file():
            raise ValueError(f"corrupt checkpoint {str(path)!r}: missing {f.name}")
    try:
        state = json.loads(sfile.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt checkpoint: {str(sfile)!r} is not valid JSON ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"corrupt checkpoint: {str(sfile)!r} has no format={FORMAT} state")
    digest = state.get("sha256", {}).get(TENSORS)
    if digest != file_sha256(tfile):
        raise ValueError(f"corrupt checkpoint: {str(tfile)!r} does not match the sha256 in {STATE}")
    try:
        tensors = load_file(str(tfile))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"corrupt checkpoint: cannot read {str(tfile)!r} ({err})") from err
    return tensors, state


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoint directories (never the one ``latest`` names)."""
    root = Path(root)
    latest = latest_checkpoint(root)
    dirs = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in dirs[:-keep] if keep > 0 else dirs:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete the ``.step_*.tmp-*`` / ``.step_*.old-*`` folders an interrupted write left in ``root``.

    Called by the trainer at start-up, before any process writes; returns the removed paths.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".step_") and (".tmp-" in p.name or ".old-" in p.name)]
    stale += [p for p in root.iterdir() if p.name.startswith(f".{LATEST}.tmp-")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def tensors_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity (empty: all finite)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
