"""Reading images (folders of PNG/JPEG, ``.npz`` arrays) and reading/writing statistics ``.npz`` files.

Statistics files hold ``mu`` ``(d,)`` and ``sigma`` ``(d, d)`` float64 (the pytorch-fid / clean-fid /
EDM format) plus fastgen metadata as 0-d string arrays (``extractor``, ``weights_sha256``,
``resize``, ``count``, ``fastgen_version``) that other tools ignore. Nothing is ever unpickled.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastgen.data.images import read_image_file, to_nchw

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_KEYS = ("arr_0", "images", "samples", "x")


@dataclass
class ReferenceStats:
    """Gaussian statistics of a feature set: ``mu (d,)``, ``sigma (d, d)`` float64 numpy, and metadata."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int | None:
        """Number of samples the statistics were computed from, when recorded."""
        c = self.meta.get("count")
        return int(c) if c not in (None, "") else None


def save_stats(
    path: str | Path, mu: np.ndarray | torch.Tensor, sigma: np.ndarray | torch.Tensor, **meta: object
) -> Path:
    """Write ``mu``/``sigma`` (as float64) and string metadata to ``path`` (``.npz`` appended if missing)."""
    from fastgen import __version__

    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    mu_np = mu.detach().cpu().double().numpy() if isinstance(mu, torch.Tensor) else np.asarray(mu, np.float64)
    sig_np = sigma.detach().cpu().double().numpy() if isinstance(sigma, torch.Tensor) else np.asarray(sigma, np.float64)
    if mu_np.ndim != 1 or sig_np.shape != (mu_np.shape[0],) * 2:
        raise ValueError(f"mu must be (d,) and sigma (d, d), got {mu_np.shape} and {sig_np.shape}")
    extra = {k: np.array(str(v)) for k, v in meta.items()}
    extra.setdefault("fastgen_version", np.array(__version__))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu_np, sigma=sig_np, **extra)
    return path


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from err


def is_stats_file(path: str | Path) -> bool:
    """True if ``path`` is an ``.npz`` holding ``mu`` and ``sigma``."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with _open_npz(path) as f:
        return "mu" in f.files and "sigma" in f.files


def load_stats(path: str | Path) -> ReferenceStats:
    """Read a statistics ``.npz`` (fastgen, pytorch-fid, clean-fid, EDM or ADM: ``mu``/``sigma`` keys).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an npz, no ``mu``/``sigma``, wrong shapes or non-finite values.
    """
    path = Path(path)
    try:
        with _open_npz(path) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(f.files)}); not a statistics file")
            mu = np.asarray(f["mu"], dtype=np.float64)
            sigma = np.asarray(f["sigma"], dtype=np.float64)
            meta = {k: str(f[k]) for k in f.files if k not in ("mu", "sigma") and f[k].ndim == 0}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path} is a corrupt .npz file ({err})") from err
    except ValueError as err:  # object (pickled) arrays are refused by allow_pickle=False, never loaded
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: statistics cannot be read ({err})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu/sigma contain NaN or Inf")
    return ReferenceStats(mu, sigma, meta)


def _npz_member(f: zipfile.ZipFile, path: Path) -> str:
    names = [n[:-4] for n in f.namelist() if n.endswith(".npy")]
    key = next((k for k in IMAGE_KEYS if k in names), None)
    if key is None:
        if len(names) != 1:
            raise ValueError(f"{path}: no image array found (looked for {IMAGE_KEYS}, keys are {sorted(names)})")
        key = names[0]
    return key + ".npy"


def npz_image_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype, str]:
    """``(shape, dtype, key)`` of the image array in an ``.npz`` without reading its data."""
    path = Path(path)
    with _open_zip(path) as zf:
        member = _npz_member(zf, path)
        with zf.open(member) as fh:
            shape, dtype, _ = _read_npy_header(fh, path, member)
    return shape, dtype, member[:-4]


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {path}")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from None


def _read_npy_header(fh, path: Path, member: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: member {member} is not a .npy array ({err})") from None
    if dtype.hasobject:  # object arrays are pickles: never read
        raise ValueError(f"{path}: {member} holds Python objects (a pickle); only numeric image arrays are read")
    if dtype.kind not in "uif":
        raise ValueError(f"{path}: {member} has dtype {dtype}; images must be uint8, uint16 or float")
    return tuple(shape), dtype, fortran


def iter_npz_batches(path: str | Path, batch_size: int = 64) -> Iterator[np.ndarray]:
    """Yield ``batch_size``-row slices of the image array of an ``.npz`` as numpy arrays, reading lazily.

    Only one batch is in memory at a time (the ``.npy`` member is read row by row from the zip, stored
    or deflated); object (pickled) arrays are refused before any data is read.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        member = _npz_member(zf, path)
        with zf.open(member) as fh:
            shape, dtype, fortran = _read_npy_header(fh, path, member)
            if fortran and len(shape) > 1:
                raise ValueError(f"{path}: {member} is Fortran-ordered; save it C-ordered (np.ascontiguousarray)")
            if len(shape) == 0:
                raise ValueError(f"{path}: {member} is a scalar, not images")
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for i in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - i)
                buf = fh.read(n * row)
                if len(buf) != n * row:
                    raise ValueError(f"{path}: {member} is truncated (row {i + len(buf) // max(row, 1)} of {shape[0]})")
                yield np.frombuffer(bytearray(buf), dtype=dtype).reshape((n, *shape[1:]))


def load_npz_images(path: str | Path) -> torch.Tensor:
    """All images of an ``.npz`` (key ``arr_0``, ``images``, ``samples`` or ``x``) as ``(N, C, H, W)``."""
    arr = np.concatenate(list(iter_npz_batches(path, 4096)))
    out, _ = to_nchw(arr, str(path))
    return torch.from_numpy(np.ascontiguousarray(out))


def list_image_files(folder: str | Path) -> list[Path]:
    """Sorted image files (png/jpg/jpeg/bmp/webp) under ``folder``, recursively.

    Raises:
        FileNotFoundError: the folder does not exist. ValueError: it holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"folder {folder} contains no images (accepted: {', '.join(IMAGE_SUFFIXES)})")
    return files


def iter_folder_batches(folder: str | Path, batch_size: int = 64, notes: list[str] | None = None
                        ) -> Iterator[torch.Tensor]:
    """Yield uint8 ``(B, C, H, W)`` batches of the images in ``folder`` (all must share a size and mode).

    Files are read by :func:`fastgen.data.images.read_image_file` (16-bit PNGs scaled, alpha dropped);
    the distinct conversion notes are appended to ``notes`` when given.
    """
    files = list_image_files(folder)
    for i in range(0, len(files), batch_size):
        read = [read_image_file(p) for p in files[i : i + batch_size]]
        arrs = [a for a, _ in read]
        if notes is not None:
            for _, info in read:
                generic = info.note.split(": ", 1)[-1]
                if generic not in notes:
                    notes.append(generic)
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            raise ValueError(f"images in {folder} differ in size/channels: {sorted(shapes)[:3]}; resize them first")
        yield torch.from_numpy(np.ascontiguousarray(np.stack(arrs).transpose(0, 3, 1, 2)))


def count_images(source: str | Path) -> int:
    """Number of images a folder or ``.npz`` holds (for progress bars)."""
    source = Path(source)
    if source.is_dir():
        return len(list_image_files(source))
    return int(npz_image_header(source)[0][0])


def save_image_folder(images: torch.Tensor, folder: str | Path) -> list[Path]:
    """Save images (uint8 or float in [-1, 1], ``(N, C, H, W)``, C in {1, 3}) as PNGs ``000000.png``..."""
    from PIL import Image

    from fastgen.metrics.features import images_to_uint8

    x = images_to_uint8(images)
    gray = images.shape[1] == 1
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, img in enumerate(x.permute(0, 2, 3, 1).cpu().numpy()):
        p = folder / f"{i:06d}.png"
        Image.fromarray(img[..., 0] if gray else img).save(p)
        out.append(p)
    return out
