"""One device resolver for every ``--device`` / ``device=`` argument.

Accepted: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"auto"`` (CUDA if available, then MPS,
then CPU) or None (CPU). Unknown names and devices this machine does not have raise a one-line
``ValueError`` naming the argument and what is accepted, before any tensor is moved.
"""

from __future__ import annotations

import torch

DEVICES_ACCEPTED = "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None, name: str = "--device") -> torch.device:
    """Return the ``torch.device`` for ``device`` after checking it exists on this machine.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"auto"``, a ``torch.device`` or None (CPU).
        name: the argument name quoted in errors.

    Raises:
        ValueError: an unknown device string, or one this machine lacks (no CUDA build/GPU, index out of range,
            no MPS).
    """
    if device is None:
        return torch.device("cpu")
    text = str(device).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} {device!r} is not a device; accepted: {DEVICES_ACCEPTED}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device!r}: CUDA is not available on this machine (use --device cpu or auto)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{name} {device!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        if not _mps_available():
            raise ValueError(f"{name} {device!r}: MPS is not available on this machine (use --device cpu or auto)")
        return dev
    raise ValueError(f"{name} {device!r} is not supported; accepted: {DEVICES_ACCEPTED}")
