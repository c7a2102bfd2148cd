"""Feature extractors: InceptionV3 (FID), the digits classifier (FD_digits), or any ``nn.Module``.

An extractor maps a batch of images to ``(features (B, d), logits (B, K) or None)``; the logits are
what the Inception Score uses (Inception's 1008-way ``logits_unbiased``; the digits classifier's
10 class logits). Image conventions:

* float images are in [-1, 1] (fastgen's convention); uint8 images are 0..255.
* Inception quantises floats to uint8 by rounding half up, ``(x * 127.5 + 128).clip(0, 255)`` then
  truncation, exactly as EDM saves its samples (torchmetrics' ``normalize=True`` truncates instead),
  and repeats 1-channel images to RGB.
* The digits classifier takes ``(N, 1, 8, 8)``; uint8 inputs are mapped by ``x / 127.5 - 1``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastgen.metrics import inception as _inc

FEATURE_NAMES = ("inception", "digits")
#: A float image may overshoot [-1, 1] (it is clipped); beyond this it is a wrong convention.
FLOAT_RANGE_LIMIT = 3.0


def images_to_uint8(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Validate ``(N, C, H, W)`` images and return uint8 RGB ``(N, 3, H, W)`` (0..255).

    Accepts uint8 (returned as is) or float in [-1, 1] (clipped, then rounded half up like EDM).
    ``C`` must be 1 (repeated to RGB) or 3.

    Raises:
        ValueError: wrong rank, channel count, dtype, NaN, or floats far outside [-1, 1]
            (e.g. 0..255 floats).
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}")
    c = images.shape[1]
    if c not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels (N, C, H, W), got C={c} (shape {tuple(images.shape)})")
    if images.dtype == torch.uint8:
        x = images
    elif images.is_floating_point():
        peak = images.abs().max() if images.numel() else torch.zeros(())
        if not torch.isfinite(peak):  # max propagates NaN; Inf stays Inf
            raise ValueError(f"{name} contains NaN or Inf")
        if peak > FLOAT_RANGE_LIMIT:
            raise ValueError(
                f"float {name} must lie in [-1, 1], got values in [{float(images.min()):.4g}, "
                f"{float(images.max()):.4g}]; pass uint8 for 0..255 images or rescale with x / 127.5 - 1"
            )
        x = (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    else:
        raise ValueError(f"{name} must be uint8 (0..255) or float in [-1, 1], got dtype {images.dtype}")
    return x.expand(-1, 3, -1, -1) if c == 1 else x


class FeatureExtractor:
    """Base class: ``extractor(images) -> (features (B, d) float, logits (B, K) or None)``.

    Attributes: ``name`` (recorded in statistics files), ``num_features`` ``d``, ``device``.
    """

    name: str = "custom"
    num_features: int | None = None
    device: torch.device = torch.device("cpu")

    def __call__(self, images: torch.Tensor, logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features ``(B, d)`` and, if ``logits`` and the network has a classifier, logits ``(B, K)``."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """Key/value strings written into statistics files."""
        return {"extractor": self.name}


class InceptionExtractor(FeatureExtractor):
    """Pool3 features ``(B, 2048)`` and ``logits_unbiased`` ``(B, 1008)`` of the FID InceptionV3.

    The network is built on first use (weights resolved as in :mod:`fastgen.metrics.inception`).

    Args:
        weights: explicit weights path or None (env var, then torch-hub cache).
        sha256: expected digest of the weights (None skips the check).
        resize: ``"tf"`` (published-FID protocol, default), ``"antialias"`` or ``"none"``.
        device: where the network runs (default: CPU).
        dtype: network dtype (float64 gives batch-size-independent features).
    """

    name = "inception"
    num_features = 2048

    def __init__(
        self,
        weights: str | Path | None = None,
        sha256: str | None = _inc.INCEPTION_SHA256,
        resize: str = "tf",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if resize not in _inc.RESIZE_MODES:
            raise ValueError(f"resize must be one of {_inc.RESIZE_MODES}, got {resize!r}")
        self.weights, self.sha256, self.resize, self.dtype = weights, sha256, resize, dtype
        self.device = torch.device(device or "cpu")
        self._net: _inc.FIDInceptionV3 | None = None
        self._digest = ""

    @property
    def net(self) -> _inc.FIDInceptionV3:
        """The loaded network (loads it on first access)."""
        if self._net is None:
            path = _inc.resolve_inception_weights(self.weights)
            self._digest = _inc.verify_sha256(path, self.sha256)
            self._net = _inc.load_inception(path, self.sha256, self.resize, self.device, self.dtype)
        return self._net

    def __call__(self, images: torch.Tensor, logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = images_to_uint8(images).to(self.device)
        # TF32 matmuls/convolutions make CUDA features depend on the batch size: off while evaluating
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                pool, unbiased = self.net(x)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        return pool, unbiased if logits else None

    def metadata(self) -> dict[str, str]:
        _ = self.net
        return {
            "extractor": "inception-v3-tf-2015-12-05",
            "weights_sha256": self._digest,
            "resize": self.resize,
        }


class DigitsExtractor(FeatureExtractor):
    """The shipped digits classifier: features ``(B, 64)``, class logits ``(B, 10)``.

    Takes ``(B, 1, 8, 8)`` float images in [-1, 1] or uint8 (mapped by ``x / 127.5 - 1``).
    """

    name = "digits"
    num_features = 64

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or "cpu")

    def __call__(self, images: torch.Tensor, logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        from fastgen.metrics.digits import _shipped, check_digits

        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        x = check_digits(images)
        net = _shipped()
        with torch.no_grad():
            f = net.features(x)
            return f, net.head(f) if logits else None

    def metadata(self) -> dict[str, str]:
        from fastgen.metrics.digits import DIGITS_WEIGHTS
        from fastgen.metrics.inception import verify_sha256

        return {
            "extractor": "fastgen-digits-classifier",
            "weights_sha256": verify_sha256(DIGITS_WEIGHTS, None),
        }


class ModuleExtractor(FeatureExtractor):
    """Any ``nn.Module`` mapping an image batch to ``(B, d)`` features (images are passed as given).

    Args:
        module: the feature network (put into eval mode; no gradients).
        name: recorded in statistics files.
        device: where the module runs (default: where its parameters are, else CPU).
    """

    def __init__(self, module: nn.Module, name: str = "custom", device: str | torch.device | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"features must be 'inception', 'digits' or an nn.Module, got {type(module).__name__}")
        self.module = module.eval()
        self.name = name
        if device is None:
            p = next(module.parameters(), None)
            device = p.device if p is not None else "cpu"
        self.device = torch.device(device)
        self.num_features = getattr(module, "num_features", None)

    def __call__(self, images: torch.Tensor, logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            f = self.module(images.to(self.device))
        if f.dim() != 2:
            f = f.reshape(f.shape[0], -1)
        return f, None


def get_extractor(
    features: str | nn.Module | FeatureExtractor = "inception",
    *,
    inception_weights: str | Path | None = None,
    sha256: str | None = _inc.INCEPTION_SHA256,
    resize: str = "tf",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> FeatureExtractor:
    """Turn ``"inception"``, ``"digits"``, an ``nn.Module`` or an extractor into an extractor."""
    if isinstance(features, FeatureExtractor):
        return features
    if isinstance(features, nn.Module):
        return ModuleExtractor(features, device=device)
    if features == "inception":
        return InceptionExtractor(inception_weights, sha256=sha256, resize=resize, device=device, dtype=dtype)
    if features == "digits":
        return DigitsExtractor(device=device)
    raise ValueError(f"features must be one of {FEATURE_NAMES} or an nn.Module, got {features!r}")
