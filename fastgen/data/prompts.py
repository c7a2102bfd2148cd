"""Text-to-image distillation data: prompt files, cached prompt embeddings and cached latents.

- :func:`read_prompts` -- a prompt file (UTF-8, one prompt a line; blank lines and ``#`` comments skipped)
  or a list of strings -> the list of prompts.
- :func:`embed_prompts` -- ``{key: (P, ...)}`` condition tensors of P prompts computed by ``encode`` ONCE
  (in chunks) and kept in a safetensors cache keyed by a fingerprint; a later call with the same
  fingerprint reads the file and never calls the encoder.
- :func:`load_images` -- "real" images from a folder (PNG/JPEG/BMP, read with Pillow, sorted by name;
  an optional ``NAME.txt`` next to an image is its prompt) or an ``.npz`` (``x`` or ``images``:
  ``(N, C, H, W)`` or ``(N, H, W[, C])``, uint8 in [0, 255] or floats in [-1, 1]; optional ``prompts``
  strings). Returns images in [-1, 1] and the per-image prompts (or None). ``.npz`` files are read with
  ``allow_pickle=False``.
- :func:`cached_tensors` -- the one cache helper: ``compute()`` once, then a safetensors file whose JSON
  metadata holds the fingerprint (a stale file is recomputed, never trusted).

This module knows nothing about models: encoders, VAEs and teachers come in as callables
(:mod:`fastgen.distill.t2i` wires them to a :func:`fastgen.models.load_model` pipeline).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_prompts", "embed_prompts", "load_images", "cached_tensors", "fingerprint", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def fingerprint(*parts: Any) -> str:
    """sha256 (first 16 hex digits) of the JSON of ``parts`` (a cache key)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_prompts(source: str | Path | Sequence[str]) -> list[str]:
    """Prompts from a file (one a line) or a list of strings; ``ValueError`` when there are none."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {str(path)!r} (a text file, one prompt a line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text: {err}") from err
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        where = repr(str(path))
    else:
        prompts = [str(p) for p in source]
        bad = [p for p in source if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {bad[:3]}")
        where = "the prompt list"
    if not prompts:
        raise ValueError(f"{where} holds no prompts (one prompt a line; '#' lines are comments)")
    return prompts


def cached_tensors(
    path: str | Path | None, key: str, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``compute()`` unless ``path`` holds tensors saved with the same ``key``; saves them when ``path`` is set.

    Tensors are stored contiguous on the CPU (safetensors; never a pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if path is not None:
        path = Path(path)
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as f:
                    stored = (f.metadata() or {}).get("fingerprint")
                if stored == key:
                    return load_file(str(path))
            except (OSError, ValueError, RuntimeError):  # unreadable or truncated cache: recompute it
                pass
    out = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(out, str(tmp), metadata={"fingerprint": key})
        tmp.replace(path)
    return out


def embed_prompts(
    prompts: Sequence[str],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    cache: str | Path | None = None,
    key: str = "",
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Condition tensors ``{name: (P, ...)}`` of ``prompts`` (row i = prompt i), computed once.

    ``encode(texts) -> {name: (len(texts), ...)}`` is called on chunks of at most ``chunk`` prompts, under
    ``no_grad``, only when ``cache`` does not already hold tensors for ``key`` (e.g. the model's
    fingerprint); the prompts themselves are part of the cache key.
    """
    texts = list(prompts)
    if not texts:
        raise ValueError("embed_prompts needs at least one prompt")

    def compute() -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for i in range(0, len(texts), chunk):
                for k, v in encode(texts[i : i + chunk]).items():
                    parts.setdefault(k, []).append(v.detach().float().cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

    return cached_tensors(cache, fingerprint("prompts", key, texts), compute)


def _to_unit(x: torch.Tensor, where: str) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images ``(N, C, H, W)`` -> float32 in [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    x = x.float()
    if not torch.isfinite(x).all() or x.min() < -1.0001 or x.max() > 1.0001:
        raise ValueError(f"{where}: float images must be finite and in [-1, 1] (or uint8 in [0, 255])")
    return x.clamp(-1, 1)


def _channels_first(x: torch.Tensor, where: str) -> torch.Tensor:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{where}: images must be (N, C, H, W), (N, H, W, C) or (N, H, W), got {tuple(x.shape)}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.permute(0, 3, 1, 2).contiguous()
    return x


def load_images(path: str | Path) -> tuple[torch.Tensor, list[str] | None]:
    """``(images (N, C, H, W) in [-1, 1], prompts or None)`` from an image folder or an ``.npz`` file."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"real images not found: {str(path)!r} (an image folder or an .npz file)")
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"real images: {str(path)!r} must be an image folder or an .npz file")
        try:
            with np.load(path, allow_pickle=False) as f:
                name = "x" if "x" in f.files else ("images" if "images" in f.files else None)
                if name is None:
                    raise ValueError(f"{str(path)!r} has no 'x' or 'images' array (has {f.files})")
                x = torch.from_numpy(np.array(f[name]))
                prompts = [str(p) for p in f["prompts"].tolist()] if "prompts" in f.files else None
        except (OSError, EOFError) as err:  # not a zip / truncated
            raise ValueError(f"cannot read the .npz file {str(path)!r}: {err}") from err
        x = _to_unit(_channels_first(x, str(path)), str(path))
        if prompts is not None and len(prompts) != len(x):
            raise ValueError(f"{str(path)!r}: 'prompts' has {len(prompts)} entries for {len(x)} images")
        return x, prompts
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays, texts = [], []
    for f in files:
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert("L") if im.mode in ("L", "1", "P", "I;16") else im.convert("RGB")))
        cap = f.with_suffix(".txt")
        texts.append(cap.read_text(encoding="utf-8").strip() if cap.is_file() else None)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"image folder {str(path)!r}: images differ in size/mode {sorted(shapes)[:3]}")
    x = _to_unit(_channels_first(torch.from_numpy(np.stack(arrays)), str(path)), str(path))
    if all(t is None for t in texts):
        return x, None
    if any(t is None for t in texts):
        missing = [f.name for f, t in zip(files, texts) if t is None][:3]
        raise ValueError(f"image folder {str(path)!r}: some images have a caption .txt and some not ({missing})")
    return x, texts
