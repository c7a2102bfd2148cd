"""One image reader: bit depth, value range and channels handled explicitly, and reported.

Every image that enters fastgen from a file or an array goes through :func:`read_image_file`
(PNG/JPEG/... files) or :func:`normalize_images` (arrays and tensors). Both say what they did in a
short note (bit depth, the value range used and whether it was given or detected, channel changes).

Value ranges (``value_range``):

* ``"uint8"``: integers 0..255; ``"uint16"``: integers 0..65535 (16-bit PNGs), mapped to 0..255 by
  ``round(v / 257)``.
* ``"0,1"``: floats in [0, 1] (Diffusers' ``output_type="pt"``/``"np"``), mapped to [-1, 1] by ``2x - 1``.
* ``"-1,1"``: floats in [-1, 1] (fastgen's convention; returned unchanged).
* ``"0,255"``: floats holding 0..255 values, rounded to uint8.
* A float range (``"0,1"``, ``"-1,1"``, ``"0,255"``) applies to float images only; integer images are
  always read by their dtype (so one ``--value-range`` can serve a float and a PNG side).
* ``"auto"``: integer dtypes are unambiguous (uint8, uint16); a float batch whose minimum is below
  -0.5 is [-1, 1]. Any other float batch (e.g. every value in [0, 1]) is ambiguous (it could be either) and is
  refused with a ``ValueError`` asking for an explicit range; so are floats far outside [-1, 1].

Output: ``uint8`` tensors (0..255) or ``float32`` tensors in [-1, 1], ``(N, C, H, W)`` with C in {1, 3}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VALUE_RANGES = ("auto", "uint8", "uint16", "0,1", "-1,1", "0,255")
#: Floats given as [0, 1] may overshoot by this much before being refused.
RANGE_SLACK = 0.05
#: Floats in [-1, 1] may overshoot up to this magnitude (raw sampler output; clipped later, as before).
FLOAT_RANGE_LIMIT = 3.0
#: Under ``"auto"``, a float batch is [-1, 1] only if its minimum is below this (clearly negative).
AUTO_NEGATIVE = -0.5


def check_value_range(value_range: str, name: str = "value_range") -> str:
    """Return ``value_range`` if it is one of :data:`VALUE_RANGES`, else raise a ValueError naming ``name``."""
    if value_range not in VALUE_RANGES:
        raise ValueError(f"{name} must be one of {', '.join(VALUE_RANGES)}; got {value_range!r}")
    return value_range


def detect_value_range(x: torch.Tensor, name: str = "images") -> tuple[str, str]:
    """``(range, reason)`` for ``x`` when it is unambiguous; ValueError naming ``value_range`` otherwise."""
    if x.dtype == torch.uint8:
        return "uint8", "uint8 dtype"
    if x.dtype in (torch.int16, torch.int32, torch.int64) or x.dtype == getattr(torch, "uint16", None):
        hi = int(x.max()) if x.numel() else 0
        lo = int(x.min()) if x.numel() else 0
        if lo < 0 or hi > 65535:
            raise ValueError(f"{name}: integer values in [{lo}, {hi}] are neither 8- nor 16-bit images")
        return ("uint8", f"integers <= 255 (max {hi})") if hi <= 255 else ("uint16", f"integers up to {hi}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: images must be uint8, uint16 or float, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} holds no pixels")
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf")
    if lo < -FLOAT_RANGE_LIMIT or hi > FLOAT_RANGE_LIMIT:
        raise ValueError(
            f"{name}: float values in [{lo:.4g}, {hi:.4g}] are outside both [0, 1] and [-1, 1]; pass "
            f"value_range='0,255' (--value-range 0,255) for 0..255 floats, or rescale"
        )
    if lo < AUTO_NEGATIVE:
        return "-1,1", f"float with negative values (min {lo:.3g})"
    raise ValueError(
        f"{name}: float values lie in [{lo:.3g}, {hi:.3g}], which fits both [0, 1] (Diffusers' pt/np "
        f"output) and [-1, 1]; say which with value_range='0,1' or '-1,1' (CLI: --value-range)"
    )


def _check_within(x: torch.Tensor, lo: float, hi: float, rng: str, name: str) -> None:
    if x.numel() == 0:
        return
    mn, mx = float(x.min()), float(x.max())
    if not (np.isfinite(mn) and np.isfinite(mx)):
        raise ValueError(f"{name} contains NaN or Inf")
    slack = RANGE_SLACK * (hi - lo) if rng != "-1,1" else FLOAT_RANGE_LIMIT - 1
    if mn < lo - slack or mx > hi + slack:
        raise ValueError(f"{name}: value_range {rng!r} but values lie in [{mn:.4g}, {mx:.4g}]")


def normalize_images(x: torch.Tensor | np.ndarray, value_range: str = "auto", name: str = "images"
                     ) -> tuple[torch.Tensor, str, str]:
    """Convert ``(N, C, H, W)`` images to uint8 (0..255) or float32 [-1, 1]; return ``(images, range, note)``.

    ``range`` is the value range that was used (for locking ``"auto"`` across batches); ``note`` says
    what happened. Channel layout is not changed here (see :func:`to_nchw`).

    Raises:
        ValueError: unknown ``value_range`` (names it), an ambiguous or impossible range under ``"auto"``,
            values outside the given range, NaN/Inf, or an unsupported dtype.
    """
    check_value_range(value_range)
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint16:
            x = x.astype(np.int32)
        if x.dtype.kind not in "uif":
            raise ValueError(f"{name}: images must be numeric arrays, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if value_range == "auto" or (value_range in ("0,1", "-1,1", "0,255") and not x.is_floating_point()):
        rng, why = detect_value_range(x, name)  # a float range given for both sides leaves integer images alone
        note = f"value range {rng} (detected: {why})"
    else:
        rng, note = value_range, f"value range {value_range} (given)"
    if rng == "uint8":
        if x.dtype != torch.uint8:
            _check_within(x.float(), 0, 255, rng, name)
            x = x.clamp(0, 255).to(torch.uint8)
        return x, rng, note
    if rng == "uint16":
        _check_within(x.float(), 0, 65535, rng, name)
        return (x.double() / 257.0).round().clamp(0, 255).to(torch.uint8), rng, note + ", 16-bit -> 8-bit by v/257"
    if not x.is_floating_point():
        raise ValueError(f"{name}: value_range {rng!r} needs float images, got dtype {x.dtype}")
    if rng == "0,255":
        _check_within(x, 0, 255, rng, name)
        return x.round().clamp(0, 255).to(torch.uint8), rng, note
    if rng == "0,1":
        _check_within(x, 0, 1, rng, name)
        return (x.float() * 2 - 1), rng, note + ", mapped to [-1, 1] by 2x - 1"
    _check_within(x, -1, 1, rng, name)
    return x.float(), rng, note


def to_nchw(arr: np.ndarray | torch.Tensor, name: str = "images") -> tuple[np.ndarray | torch.Tensor, str]:
    """``(N, C, H, W)`` from ``(N, H, W)``, NHWC or NCHW with C in {1, 3}; returns ``(array, layout note)``.

    Raises:
        ValueError: another rank, or no axis of size 1 or 3 where channels can be (4-channel RGBA arrays
            are refused: drop the alpha channel explicitly).
    """
    if arr.ndim == 3:
        return arr[:, None], "layout (N, H, W) -> 1 channel"
    if arr.ndim != 4:
        raise ValueError(
            f"{name}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {tuple(arr.shape)}"
        )
    if arr.shape[1] in (1, 3):
        return arr, f"layout NCHW, {arr.shape[1]} channel(s)"
    if arr.shape[-1] in (1, 3):
        perm = arr.transpose(0, 3, 1, 2) if isinstance(arr, np.ndarray) else arr.permute(0, 3, 1, 2)
        return perm, f"layout NHWC -> NCHW, {arr.shape[-1]} channel(s)"
    raise ValueError(
        f"{name}: shape {tuple(arr.shape)} has no channel axis of size 1 or 3 (NCHW or NHWC); "
        "RGBA/2-channel images must have alpha dropped first"
    )


@dataclass
class ImageInfo:
    """What :func:`read_image_file` did: the file's mode and bit depth, and the conversion applied."""

    path: str
    mode: str
    bit_depth: int
    channels: int
    note: str


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")


def read_image_file(path: str | Path, channels: int | None = None) -> tuple[np.ndarray, ImageInfo]:
    """Read one image file as uint8 ``(H, W, C)`` (C = 1 or 3) and say what was done.

    16-bit grayscale PNGs are scaled ``round(v / 257)`` (not clipped: clipping makes them black and
    white); alpha is dropped; palette/CMYK images become RGB; ``channels`` (1 or 3) forces gray or RGB
    (gray -> RGB repeats the channel; RGB -> gray is refused: convert it yourself).

    Raises:
        FileNotFoundError: no such file. ValueError: not an image (names the file), bad ``channels``.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    if not p.is_file():
        raise FileNotFoundError(f"no such image file: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode in _GRAY_MODES:
                arr = np.asarray(im.convert("L") if mode in ("1", "LA") else im)
                if arr.dtype != np.uint8:  # 16-bit (I;16*) or 32-bit int ("I") grayscale
                    hi = int(arr.max()) if arr.size else 0
                    if arr.min() < 0 or hi > 65535:
                        raise ValueError(f"image {p}: {mode} pixel values in [{arr.min()}, {hi}] are not 16-bit")
                    arr = np.round(arr.astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)
                    depth, note = 16, f"{p.name}: 16-bit grayscale -> 8-bit by v/257"
                else:
                    depth, note = 8, f"{p.name}: 8-bit grayscale" + (" (alpha dropped)" if mode == "LA" else "")
                arr = arr[..., None]
            else:
                arr = np.asarray(im.convert("RGB"))
                depth = 8
                note = f"{p.name}: {mode} -> RGB" + (" (alpha dropped)" if "A" in mode else "")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {p} ({err})") from None
    if channels == 3 and arr.shape[-1] == 1:
        arr, note = np.repeat(arr, 3, axis=-1), note + ", gray repeated to RGB"
    elif channels == 1 and arr.shape[-1] == 3:
        raise ValueError(f"image {p} is RGB but channels=1 was asked; convert it to grayscale first")
    return arr, ImageInfo(str(p), mode, depth, arr.shape[-1], note)
