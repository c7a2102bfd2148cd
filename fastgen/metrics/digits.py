"""The digits feature network: a small MLP classifier on the 8x8 digits, and FD_digits.

The classifier (64 -> 128 -> 64 -> 10, SiLU) is trained by :func:`train_digits_classifier` on the
898-image train split of :func:`fastgen.data.load_digits_split` and shipped as
``fastgen/models/weights/digits-classifier.safetensors`` (about 70 KB). Its 64-d penultimate layer
is the feature space of ``FD_digits``: the Frechet distance the digits test bed reports, computed
against the 899 held-out test digits (or the train digits) whose statistics are cached.

Inputs are ``(N, 1, 8, 8)`` (or ``(N, 64)``) float images in [-1, 1]; values are clipped to
[-1, 1] like an image that is saved, and values outside [-4, 4] raise (a different convention,
e.g. [0, 16] or [0, 255]).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from fastgen.io.hashing import file_sha256

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "models" / "weights"
DIGITS_WEIGHTS = WEIGHTS_DIR / "digits-classifier.safetensors"
NUM_FEATURES = 64
NUM_CLASSES = 10
#: Inputs beyond this magnitude are taken as a wrong value convention and rejected.
RANGE_LIMIT = 4.0


class DigitsClassifier(nn.Module):
    """MLP ``64 -> 128 -> 64 -> 10`` with SiLU; ``features`` is the 64-d penultimate activation.

    ``forward(x)`` returns features ``(N, 64)`` (so the module is a drop-in feature network for
    FID code, including ``torchmetrics.image.FrechetInceptionDistance(feature=...)``);
    ``logits(x)`` returns ``(N, 10)`` class logits. ``x`` is ``(N, 1, 8, 8)`` or ``(N, 64)`` in [-1, 1].
    """

    num_features = NUM_FEATURES

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, NUM_FEATURES), nn.SiLU())
        self.head = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, 64)``."""
        return self.body(x.reshape(x.shape[0], -1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, 10)``."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def train_digits_classifier(
    steps: int = 400, lr: float = 3e-3, weight_decay: float = 1e-4, noise: float = 0.3, seed: int = 0
) -> DigitsClassifier:
    """Train :class:`DigitsClassifier` on the digits train split (full batch Adam, ~1 s on a CPU).

    Args:
        steps: optimizer steps (full batch of 898 images).
        lr: Adam learning rate (cosine-decayed to 0).
        weight_decay: AdamW weight decay.
        noise: std of the Gaussian input noise used as augmentation (in [-1, 1] units).
        seed: seed of initialisation and noise; same seed, same weights.
    """
    from fastgen.data import load_digits_split

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsClassifier()
    train = load_digits_split("train")
    x, y = train.images.reshape(len(train), -1), train.labels
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        xb = x + noise * torch.randn(x.shape, generator=gen) if noise > 0 else x
        loss = nn.functional.cross_entropy(net.logits(xb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def digits_accuracy(net: DigitsClassifier, split: str = "test") -> float:
    """Classification accuracy of ``net`` on a digits split (``"train"``, ``"test"``, ``"all"``)."""
    from fastgen.data import load_digits_split

    data = load_digits_split(split)
    with torch.no_grad():
        pred = net.logits(data.images).argmax(dim=1)
    return float((pred == data.labels).float().mean())


def save_digits_classifier(net: DigitsClassifier, path: str | Path, card: dict | None = None) -> str:
    """Save ``net`` as safetensors (plus ``<path>.json`` with ``card`` and the sha256); return the sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    digest = file_sha256(path)
    meta = dict(card or {})
    meta["sha256"] = digest
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return digest


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """Load the shipped digits classifier (or one saved by :func:`save_digits_classifier` at ``path``)."""
    from safetensors.torch import load_file

    path = DIGITS_WEIGHTS if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits classifier weights not found at {path}; recreate them with "
            "`python -m fastgen.metrics.digits` (trains in about a second)"
        )
    net = DigitsClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def _shipped() -> DigitsClassifier:
    return load_digits_classifier()


def check_digits(samples: torch.Tensor, name: str = "samples") -> torch.Tensor:
    """Validate digits images and return them as float32 ``(N, 64)`` on the CPU, clipped to [-1, 1].

    Accepts ``(N, 1, 8, 8)``, ``(N, 8, 8)`` or ``(N, 64)`` float tensors in [-1, 1].
    """
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, 1, 8, 8), got {type(samples).__name__}")
    if not samples.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [-1, 1], got dtype {samples.dtype}")
    shape = tuple(samples.shape)
    if not (shape[1:] in ((1, 8, 8), (8, 8), (64,)) and len(shape) >= 2):
        if len(shape) == 4 and shape[2:] == (8, 8):
            raise ValueError(f"{name} must have 1 channel (N, 1, 8, 8), got {shape[1]} channels (shape {shape})")
        raise ValueError(f"{name} must have shape (N, 1, 8, 8), got {shape}")
    x = samples.detach().to(device="cpu", dtype=torch.float32).reshape(shape[0], 64)
    if x.numel() == 0:
        return x
    lo, hi = (float(v) for v in torch.aminmax(x))  # one pass; NaN propagates, Inf stays Inf
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf")
    if max(-lo, hi) > RANGE_LIMIT:
        raise ValueError(
            f"{name} must lie in [-1, 1] (digits convention), got values in "
            f"[{lo:.3g}, {hi:.3g}]; rescale e.g. x / 8 - 1 for 0..16 data"
        )
    return x.clamp(-1.0, 1.0) if lo < -1.0 or hi > 1.0 else x


def digits_features(samples: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Features ``(N, 64)`` float32 of the shipped classifier for ``(N, 1, 8, 8)`` samples in [-1, 1]."""
    x = check_digits(samples)
    net = _shipped()
    with torch.no_grad():
        return torch.cat([net.features(x[i : i + batch_size]) for i in range(0, max(len(x), 1), batch_size)])


def digits_logits(samples: torch.Tensor) -> torch.Tensor:
    """Class logits ``(N, 10)`` of the shipped digits classifier."""
    x = check_digits(samples)
    with torch.no_grad():
        return _shipped().logits(x)


@lru_cache(maxsize=4)
def digits_reference_stats(reference: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Cached float64 ``(mu, sigma)`` of the digits features of a real split ("test", "train", "all")."""
    from fastgen.data import load_digits_split
    from fastgen.metrics.stats import FeatureStatistics

    if reference not in ("test", "train", "all"):
        raise ValueError(f"reference must be 'test', 'train', 'all' or an image tensor, got {reference!r}")
    st = FeatureStatistics(NUM_FEATURES)
    st.update(digits_features(load_digits_split(reference).images))
    return st.mu, st.sigma


def digits_fd(samples: torch.Tensor, reference: str | torch.Tensor = "test") -> float:
    """FD_digits: Frechet distance in the digits classifier's 64-d feature space.

    Args:
        samples: ``(N, 1, 8, 8)`` float images in [-1, 1], N >= 2 (use N ~ 900 to compare with the
            documented numbers: FD has a 1/N bias).
        reference: ``"test"`` (the 899 held-out digits, default), ``"train"`` (the 898 train digits),
            ``"all"``, or a tensor of reference images with the same convention.

    Returns:
        The distance (float). Calibration on 898-899 images: held-out real ~0.2, noisy real
        higher, missing classes much higher, a single class highest (see docs/metrics.md).
    """
    from fastgen.metrics.stats import FeatureStatistics, frechet_distance

    st = FeatureStatistics(NUM_FEATURES)
    st.update(digits_features(samples))
    if isinstance(reference, str):
        mu_r, sig_r = digits_reference_stats(reference)
    elif isinstance(reference, torch.Tensor):
        ref = FeatureStatistics(NUM_FEATURES)
        ref.update(digits_features(reference))
        mu_r, sig_r = ref.mu, ref.sigma
    else:
        raise ValueError(f"reference must be 'test', 'train', 'all' or an image tensor, got {type(reference).__name__}")
    return frechet_distance(st.mu, st.sigma, mu_r, sig_r)


def _main() -> None:  # pragma: no cover - regenerates the shipped weights
    import time

    t0 = time.perf_counter()
    net = train_digits_classifier()
    secs = time.perf_counter() - t0
    card = {
        "architecture": "MLP 64-128-64-10, SiLU; features = 64-d penultimate layer",
        "trained_by": "fastgen.metrics.digits.train_digits_classifier"
        "(steps=400, lr=3e-3, weight_decay=1e-4, noise=0.3, seed=0)",
        "train_split": "fastgen.data.load_digits_split('train') (898 images)",
        "train_accuracy": digits_accuracy(net, "train"),
        "test_accuracy": digits_accuracy(net, "test"),
        "train_seconds": round(secs, 2),
    }
    digest = save_digits_classifier(net, DIGITS_WEIGHTS, card)
    print(json.dumps(card, indent=2), digest)


if __name__ == "__main__":  # pragma: no cover
    _main()
