"""The FID InceptionV3 (TensorFlow "2015-12-05" graph ported to PyTorch), offline weight loading.

The network is the FID variant of InceptionV3 used by TF FID, torch-fidelity, torchmetrics and
pytorch-fid: TF-style average pooling (padding excluded), max pooling in the last block, 1008
classes. Parameter names match ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity /
torchmetrics) = ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid), so that file loads as is.

Weights are never downloaded. :func:`resolve_inception_weights` looks, in order, at

1. an explicit path (``weights=`` / ``--inception-weights``),
2. the environment variable ``FASTGEN_INCEPTION_WEIGHTS``,
3. the torch-hub cache ``$TORCH_HOME/hub/checkpoints/`` under either file name,

and otherwise raises ``FileNotFoundError`` naming the file, its size, sha256 and download URLs.
The sha256 is verified once per file (the torch-hub cache does not check it); the file is loaded
with ``torch.load(..., weights_only=True)`` (``.safetensors`` files are also accepted).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.io.hashing import file_sha256

INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_SIZE = 95_628_359
INCEPTION_FILENAMES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)
INCEPTION_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
ENV_VAR = "FASTGEN_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
RESIZE_MODES = ("tf", "antialias", "none")


# --------------------------------------------------------------------------------------------- resize
def tf_bilinear_resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize exactly as TensorFlow 1.x ``resize_bilinear(align_corners=False)``.

    This is the resize of the TF FID code and torch-fidelity: the source coordinate of output pixel
    ``i`` is ``i * in / out`` (no half-pixel offset, no antialiasing), neighbours are clamped at the
    border. Args: ``x`` float ``(N, C, H, W)``; ``size`` the output ``(H', W')`` or an int.
    Returns ``(N, C, H', W')`` in ``x.dtype``.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    oh, ow = (size, size) if isinstance(size, int) else size

    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        pos = torch.arange(n_out, dtype=torch.float32) * scale
        lo = pos.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        frac = (pos - lo.float()).to(device=x.device, dtype=x.dtype)
        return lo.to(x.device), hi.to(x.device), frac

    ylo, yhi, dy = axis(x.shape[2], oh)
    xlo, xhi, dx = axis(x.shape[3], ow)
    rows_lo, rows_hi = x.index_select(2, ylo), x.index_select(2, yhi)
    top = rows_lo.index_select(3, xlo)
    top = top + (rows_lo.index_select(3, xhi) - top) * dx.view(1, 1, 1, ow)
    bot = rows_hi.index_select(3, xlo)
    bot = bot + (rows_hi.index_select(3, xhi) - bot) * dx.view(1, 1, 1, ow)
    return top + (bot - top) * dy.view(1, 1, oh, 1)


def resize_to_inception(x: torch.Tensor, mode: str = "tf") -> torch.Tensor:
    """Resize float ``(N, 3, H, W)`` pixel values (0..255) to 299x299.

    ``mode``: ``"tf"`` (TF1-compatible, the protocol of published FIDs; default), ``"antialias"``
    (torch bilinear with antialiasing, torchmetrics >= 1.8's default) or ``"none"`` (input must
    already be 299x299).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    if tuple(x.shape[2:]) == (INPUT_SIZE, INPUT_SIZE):
        return x
    if mode == "tf":
        return tf_bilinear_resize(x, INPUT_SIZE)
    if mode == "antialias":
        return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"resize='none' needs 299x299 images, got {tuple(x.shape[2:])}")


# --------------------------------------------------------------------------------------------- network
class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU."""

    def __init__(self, cin: int, cout: int, **kw: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3 average pool does not count the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Last blocks; ``max_pool`` selects the TF graph's max pooling in ``Mixed_7c``."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3. ``forward(x)`` takes uint8 ``(N, 3, H, W)`` images (0..255) and returns
    ``(pool, logits_unbiased)``: pool3 features ``(N, 2048)`` and ``x @ fc.weight.T`` ``(N, 1008)``
    (the logits without bias, used by the Inception Score), in the network's dtype.

    Args:
        resize: see :func:`resize_to_inception` (``"tf"`` by default).
    """

    num_features = 2048

    def __init__(self, resize: str = "tf") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Always stays in evaluation mode (BatchNorm uses its running statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 expects uint8 (N, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        dtype = self.fc.weight.dtype
        x = resize_to_inception(x.to(dtype), self.resize)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return pool, pool.mm(self.fc.weight.T)


# --------------------------------------------------------------------------------------------- weights
_VERIFIED: dict[tuple[str, int, int], str] = {}


def _missing_message(tried: list[str]) -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        "InceptionV3 FID weights not found (looked at: " + ", ".join(tried) + "). fastgen never downloads "
        f"them. Get the file {INCEPTION_FILENAMES[0]} ({INCEPTION_SIZE:,} bytes, sha256 {INCEPTION_SHA256}) "
        f"from {INCEPTION_URLS[0]} or, as {INCEPTION_FILENAMES[1]}, from {INCEPTION_URLS[1]}, then either "
        f"pass it with --inception-weights PATH / weights=PATH, set {ENV_VAR}=PATH, or put it into {hub}/"
    )


def resolve_inception_weights(weights: str | Path | None = None) -> Path:
    """Find the Inception weights file: explicit path -> ``$FASTGEN_INCEPTION_WEIGHTS`` -> torch-hub cache.

    Raises:
        FileNotFoundError: an explicit or environment path that does not exist, or nothing found;
            the message names the file, its size, sha256, URLs and where to put it.
    """
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"inception weights: no such file {p}. " + _missing_message([str(p)]))
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={env}: no such file. " + _missing_message([str(p)]))
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    tried = []
    for name in INCEPTION_FILENAMES:
        p = hub / name
        tried.append(str(p))
        if p.is_file():
            return p
    raise FileNotFoundError(_missing_message([f"weights=None, ${ENV_VAR} unset"] + tried))


def verify_sha256(path: Path, expected: str | None) -> str:
    """Check (once per path/size/mtime) that ``path`` hashes to ``expected``; return the digest.

    ``expected=None`` skips the comparison (the digest is still computed and returned).
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key)
    if digest is None:
        digest = file_sha256(path)
        _VERIFIED[key] = digest
    if expected is not None and digest != expected.lower():
        raise ValueError(
            f"inception weights {path}: sha256 {digest} does not match the expected {expected} "
            f"(the FID weights are {INCEPTION_FILENAMES[0]}, {INCEPTION_SIZE:,} bytes); pass the right file "
            "or, for a deliberately different network, sha256=None / the file's own hash"
        )
    return digest


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (``weights_only=True``: no code unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or a pickle with code in it
        raise ValueError(f"inception weights {path}: not a loadable state dict ({err})") from err
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"inception weights {path}: expected a state dict, got {type(sd).__name__}")
    return sd


def load_inception(
    weights: str | Path | None = None,
    sha256: str | None = INCEPTION_SHA256,
    resize: str = "tf",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load its weights (resolution order in the module docstring).

    Args:
        weights: explicit weights path (``.pth`` state dict or ``.safetensors``), or None to search.
        sha256: expected digest (default: the standard FID weights); None skips the check.
        resize: ``"tf"`` (default), ``"antialias"`` or ``"none"``.
        device, dtype: where and in which float type the network runs (float64 for exactness).
    """
    path = resolve_inception_weights(weights)
    verify_sha256(path, sha256)
    sd = load_state_dict_file(path)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    net = FIDInceptionV3(resize=resize)
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(
            f"inception weights {path}: keys do not match the FID InceptionV3 "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    net.load_state_dict(sd, strict=False)
    return net.to(device=device, dtype=dtype).requires_grad_(False).eval()


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random state dict for :class:`FIDInceptionV3` (tests and benchmarks without the real weights).

    Convolutions get He-normal weights and BatchNorm neutral statistics, so activations keep their
    scale through the 94 layers (PyTorch's default init would shrink the pool3 features to ~1e-8).
    """
    gen = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3()
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            v = torch.randn(v.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif k == "fc.weight":
            v = torch.randn(v.shape, generator=gen) / v.shape[1] ** 0.5
        elif k == "fc.bias":
            v = 0.1 * torch.randn(v.shape, generator=gen)
        sd[k] = v.contiguous()
    return sd
