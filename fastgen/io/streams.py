"""Write samples to disk as they are produced, in constant memory.

:class:`NpzStreamWriter` writes one ``.npz`` whose single array (``samples``, shape known up front)
is appended batch by batch into the zip member, so ``np.load`` reads the result like any
``np.savez`` file while the writer holds one batch at a time (small ``extra`` arrays are added at
the end). The file appears atomically (a
temporary name is renamed on success; nothing is left on failure). :class:`PngStreamWriter`
writes ``000000.png``, ``000001.png``... as batches arrive.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.io.paths import check_output_path


class NpzStreamWriter:
    """Stream ``(N, *shape)`` float32 rows into ``path`` (an ``.npz`` with one array ``key``).

    Use as a context manager: ``with NpzStreamWriter(path, n, shape) as w: w.write(batch)``. Exactly
    ``n`` rows must be written before the block ends; otherwise the partial file is removed.
    """

    def __init__(self, path: str | Path, n: int, shape: tuple[int, ...], key: str = "samples",
                 name: str = "--out", extra: dict[str, np.ndarray] | None = None) -> None:
        self.path = check_output_path(path, name)
        self.extra = dict(extra or {})
        self.n, self.shape, self.key, self.written = int(n), tuple(int(s) for s in shape), key, 0
        self._tmp: str | None = None
        self._zip: zipfile.ZipFile | None = None
        self._fh: Any = None

    def __enter__(self) -> NpzStreamWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._fh = self._zip.open(self.key + ".npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (self.n, *self.shape)}
        np.lib.format.write_array_header_2_0(self._fh, header)
        return self

    def write(self, batch: torch.Tensor | np.ndarray) -> None:
        """Append a batch ``(B, *shape)`` (converted to float32)."""
        arr = batch.detach().cpu().float().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.shape[1:] != self.shape:
            raise ValueError(f"{self.path}: batch shape {arr.shape[1:]} differs from {self.shape}")
        if self.written + arr.shape[0] > self.n:
            raise ValueError(f"{self.path}: more than the announced {self.n} rows written")
        self._fh.write(arr.tobytes())
        self.written += arr.shape[0]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        ok = exc_type is None and self.written == self.n
        try:
            self._fh.close()
            if ok:
                for k, v in self.extra.items():  # small arrays (metadata), never object dtype
                    with self._zip.open(k + ".npy", "w") as fh:
                        np.lib.format.write_array(fh, np.asarray(v), allow_pickle=False)
            self._zip.close()
        finally:
            if ok:
                os.replace(self._tmp, self.path)
            else:
                Path(self._tmp).unlink(missing_ok=True)
        if exc_type is None and not ok:
            raise ValueError(f"{self.path}: {self.written} rows written, {self.n} announced; nothing was saved")


class PngStreamWriter:
    """Write image batches (uint8, or float in [-1, 1], ``(B, C, H, W)``) as numbered PNGs in ``folder``."""

    def __init__(self, folder: str | Path, name: str = "--out") -> None:
        self.folder = check_output_path(folder, name, kind="folder")
        self.written = 0

    def __enter__(self) -> PngStreamWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, batch: torch.Tensor) -> None:
        from PIL import Image

        x = batch.detach().cpu()
        if x.dtype != torch.uint8:
            x = (x.float().clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        for img in x.permute(0, 2, 3, 1).numpy():
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(self.folder / f"{self.written:06d}.png")
            self.written += 1

    def __exit__(self, *exc: Any) -> None:
        return None
