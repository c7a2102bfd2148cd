"""The 8x8 digits of scikit-learn (bundled in its wheel; nothing is downloaded).

Images are returned as float32 tensors of shape ``(N, 1, 8, 8)`` scaled from the integer
range 0..16 into [-1, 1] by ``x / 8 - 1``; labels are int64 in 0..9.

The split is fixed: 898 train / 899 test images, stratified by class with seed 0, so every
FD number in fastgen refers to the same halves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

N_TRAIN = 898
N_TEST = 899
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    """One half of the digits set: ``images`` (N, 1, 8, 8) in [-1, 1], ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


@lru_cache(maxsize=1)
def _split_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 8.0 - 1.0
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=N_TEST, train_size=N_TRAIN, stratify=labels, random_state=SPLIT_SEED
    )
    return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


def load_digits_split(split: str = "train") -> DigitsSplit:
    """Return the ``"train"`` (898), ``"test"`` (899) or ``"all"`` (1797) digits as tensors."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    arrays = _split_arrays()
    if split == "all":
        x = np.concatenate([arrays["train"][0], arrays["test"][0]])
        y = np.concatenate([arrays["train"][1], arrays["test"][1]])
    else:
        x, y = arrays[split]
    return DigitsSplit(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.copy()))
