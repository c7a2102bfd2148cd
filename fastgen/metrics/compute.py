"""FID / FD, Inception Score, KID and precision/recall over images streamed in batches.

A *source* of images is any of: a tensor ``(N, C, H, W)`` (uint8, or float in [-1, 1]); an iterable
of such batches (e.g. a generator drawing from a sampler, so N samples never sit in memory); a path
to a folder of PNG/JPEG images or to an ``.npz`` of images; or a data set name ``"digits:train"``,
``"digits:test"``, ``"digits:all"``. A *reference* for FID is a source, a statistics ``.npz``
(``mu``/``sigma``: fastgen, pytorch-fid, clean-fid, EDM, ADM) or a :class:`ReferenceStats`.

Statistics are float64 running sums (:class:`~fastgen.metrics.stats.FeatureStatistics`, a
torchmetrics ``Metric`` that merges across processes), so memory is O(d^2) in the sample count;
IS, KID and precision/recall need the features themselves and keep them (``(N, d)`` float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastgen.metrics import io as _io
from fastgen.metrics.features import FeatureExtractor, get_extractor
from fastgen.metrics.stats import FeatureStatistics, frechet_distance

Source = torch.Tensor | Iterable[torch.Tensor] | str | Path
Reference = Source | _io.ReferenceStats
Features = str | nn.Module | FeatureExtractor


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def iter_source(source: Source, batch_size: int = 64) -> tuple[Iterator[torch.Tensor], int | None]:
    """Turn a source into ``(iterator over image batches, total count or None)``."""
    _check_batch_size(batch_size)
    if isinstance(source, torch.Tensor):
        if source.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(source.shape)}")
        n = source.shape[0]
        return (source[i : i + batch_size] for i in range(0, n, batch_size)), n
    if isinstance(source, str) and source.startswith("digits:"):
        from fastgen.data import load_digits_split

        split = source.split(":", 1)[1]
        return iter_source(load_digits_split(split).images, batch_size)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = _io.list_image_files(path)
            return _io.iter_folder_batches(path, batch_size), len(files)
        if path.suffix == ".npz":
            if _io.is_stats_file(path):
                raise ValueError(f"{path} holds statistics (mu/sigma), not images; it can only be a FID reference")
            return iter_source(_io.load_npz_images(path), batch_size)
        if not path.exists():
            raise FileNotFoundError(f"no such folder or .npz file: {path}")
        raise ValueError(f"{path}: expected a folder of images, an .npz file or 'digits:<split>'")
    if isinstance(source, Iterable):
        return iter(source), None
    raise ValueError(
        f"images must be a tensor, an iterable of tensors, a folder or an .npz; got {type(source).__name__}"
    )


@dataclass
class FeatureSet:
    """Result of :func:`extract_features`: float64 statistics, optional features/logits, metadata."""

    stats: FeatureStatistics
    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def reference(self) -> _io.ReferenceStats:
        """The statistics as a :class:`ReferenceStats` (numpy float64) with count in the metadata."""
        mu, sigma, count = self.stats.global_stats()  # summed over processes under torch.distributed
        return _io.ReferenceStats(mu.numpy(), sigma.numpy(), dict(self.meta, count=str(count)))


def extract_features(
    source: Source,
    features: Features = "inception",
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    inception_weights: str | Path | None = None,
    resize: str = "tf",
    dtype: torch.dtype = torch.float32,
    keep_features: bool = False,
    keep_logits: bool = False,
    max_samples: int | None = None,
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """Stream a source through a feature network, accumulating float64 statistics.

    Args:
        source: images (see module docstring).
        features: ``"inception"``, ``"digits"``, an ``nn.Module`` or a :class:`FeatureExtractor`.
        batch_size: images per forward pass (sources that are iterables keep their own batches).
        device, inception_weights, resize, dtype: passed to the extractor (see :func:`get_extractor`);
            ``dtype=torch.float64`` runs Inception in double precision (batch-size independent features).
        keep_features / keep_logits: also return all features ``(N, d)`` / logits ``(N, K)`` (float32).
        max_samples: stop after this many images.
        progress: show a tqdm bar.

    Raises:
        ValueError: fewer than 2 images, inconsistent feature sizes, bad image values.
    """
    from tqdm.auto import tqdm

    ex = get_extractor(features, inception_weights=inception_weights, resize=resize, device=device, dtype=dtype)
    batches, total = iter_source(source, batch_size)
    if max_samples is not None:
        if not isinstance(max_samples, int) or max_samples < 2:
            raise ValueError(f"max_samples must be an int >= 2 (or None), got {max_samples!r}")
        total = max_samples if total is None else min(total, max_samples)
    stats = FeatureStatistics(ex.num_features)
    kept_f: list[torch.Tensor] = []
    kept_l: list[torch.Tensor] = []
    seen = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in batches:
            if max_samples is not None:
                batch = batch[: max_samples - seen]
            f, logits = ex(batch, logits=keep_logits)
            stats.update(f)
            if keep_features:
                kept_f.append(f.detach().float().cpu())
            if keep_logits:
                if logits is None:
                    raise ValueError("this feature network has no class logits (needed for the Inception Score)")
                kept_l.append(logits.detach().float().cpu())
            seen += f.shape[0]
            bar.update(f.shape[0])
            if max_samples is not None and seen >= max_samples:
                break  # do not draw another batch from a (possibly endless) sampler
    if stats.count < 2:
        raise ValueError(f"at least 2 images are needed, got {stats.count}")
    return FeatureSet(
        stats,
        torch.cat(kept_f) if keep_features else None,
        torch.cat(kept_l) if keep_logits else None,
        ex.metadata(),
    )


def compute_reference_stats(source: Source, features: Features = "inception", **kw: Any) -> _io.ReferenceStats:
    """Statistics (``mu``, ``sigma``, metadata) of a source; keyword arguments as :func:`extract_features`."""
    return extract_features(source, features, **kw).reference()


def _is_stats(x: object) -> bool:
    """True for a :class:`ReferenceStats` or a path to a statistics ``.npz``."""
    if isinstance(x, _io.ReferenceStats):
        return True
    return isinstance(x, (str, Path)) and Path(x).suffix == ".npz" and _io.is_stats_file(x)


def _reference_stats(reference: Reference, features: Features, kw: dict[str, Any]) -> _io.ReferenceStats:
    if isinstance(reference, _io.ReferenceStats):
        return reference
    if _is_stats(reference):
        return _io.load_stats(reference)
    return compute_reference_stats(reference, features, desc="reference", **kw)


def _check_same_extractor(a: dict[str, str], b: dict[str, str]) -> None:
    ea, eb = a.get("extractor"), b.get("extractor")
    if ea and eb and ea != eb:
        raise ValueError(f"statistics come from different feature networks: {ea!r} vs {eb!r}")


def _pop_extractor(features: Features, kw: dict[str, Any]) -> FeatureExtractor:
    """Build the extractor once from ``features`` and the extractor options popped out of ``kw``."""
    return get_extractor(
        features,
        inception_weights=kw.pop("inception_weights", None),
        resize=kw.pop("resize", "tf"),
        device=kw.pop("device", None),
        dtype=kw.pop("dtype", torch.float32),
    )


def fid_from_stats(a: _io.ReferenceStats, b: _io.ReferenceStats) -> float:
    """Frechet distance between two :class:`ReferenceStats` (checks their feature sizes and extractors)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"mismatched feature sizes: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    _check_same_extractor(a.meta, b.meta)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid(samples: Reference, reference: Reference, features: Features = "inception", **kw: Any) -> float:
    """FID (Inception features) or, with ``features="digits"`` / a module, the FD in that space.

    Args:
        samples: images or statistics (see module docstring).
        reference: images, a statistics ``.npz`` or :class:`ReferenceStats`.
        features: ``"inception"`` (default), ``"digits"``, an ``nn.Module`` or an extractor.
        **kw: ``batch_size``, ``device``, ``inception_weights``, ``resize``, ``progress``, ``max_samples``.
    """
    ex = _pop_extractor(features, kw)
    ref = _reference_stats(reference, ex, kw)
    fake = _reference_stats(samples, ex, kw)
    return fid_from_stats(fake, ref)


class FrechetDistance:
    """Streaming FD against a fixed reference: ``update(batch)`` as a sampler produces images,
    then ``compute()``.

    Args:
        reference: images, a statistics ``.npz`` or :class:`ReferenceStats` (computed once).
        features, **kw: as :func:`extract_features`.
    """

    def __init__(self, reference: Reference, features: Features = "inception", **kw: Any) -> None:
        self.extractor = _pop_extractor(features, kw)
        self.kw = kw
        self.ref = _reference_stats(reference, self.extractor, dict(kw))
        self.stats = FeatureStatistics(self.extractor.num_features)

    def update(self, images: torch.Tensor) -> None:
        """Add a batch of generated images ``(B, C, H, W)``."""
        f, _ = self.extractor(images, logits=False)
        self.stats.update(f)

    def compute(self) -> float:
        """FD between everything added so far and the reference."""
        mu, sigma, _ = self.stats.global_stats()  # summed over processes under torch.distributed
        mine = _io.ReferenceStats(mu.numpy(), sigma.numpy(), self.extractor.metadata())
        return fid_from_stats(mine, self.ref)

    def reset(self) -> None:
        """Forget the generated side (the reference is kept)."""
        self.stats.reset()


# ------------------------------------------------------------------------------------------ IS, KID, P/R
def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from logits, over ``splits`` contiguous splits.

    Args:
        logits: ``(N, K)``; for Inception the 1008-way ``logits_unbiased`` (no bias), as TF/torch-fidelity.
        splits: number of splits (10 by convention); N >= splits.

    Returns:
        ``(mean, std)`` over splits, std with the population convention (ddof=0, as TF and torch-fidelity;
        torchmetrics uses Bessel's correction).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (N, K) tensor, got {getattr(logits, 'shape', type(logits))}")
    n = logits.shape[0]
    if splits < 1 or n < max(2, splits):
        raise ValueError(f"inception_score needs N >= max(2, splits); got N={n}, splits={splits}")
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        part_p, part_logp = p[lo:hi], logp[lo:hi]
        log_py = torch.log(part_p.mean(dim=0, keepdim=True))
        kl = (part_p * (part_logp - log_py)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def kid(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with ``k(x, y) = (x.y / d + 1)^3``, over random subsets.

    Uses torchmetrics' ``poly_mmd`` in float64; subsets are drawn without replacement with a seeded
    generator. Returns ``(mean, std)`` over subsets (population std).

    Raises:
        ValueError: feature sizes differ or either set has fewer than ``subset_size`` rows.
    """
    from torchmetrics.image.kid import poly_mmd

    _check_pair(real_features, fake_features)
    n_r, n_f = real_features.shape[0], fake_features.shape[0]
    if subset_size < 2 or min(n_r, n_f) < subset_size:
        raise ValueError(
            f"kid needs subset_size >= 2 and both sets at least subset_size={subset_size} samples; "
            f"got {n_r} real and {n_f} generated (lower subset_size, conventionally 1000)"
        )
    gen = torch.Generator().manual_seed(seed)
    fr, ff = real_features.double().cpu(), fake_features.double().cpu()
    vals = []
    for _ in range(subsets):
        a = fr[torch.randperm(n_r, generator=gen)[:subset_size]]
        b = ff[torch.randperm(n_f, generator=gen)[:subset_size]]
        vals.append(float(poly_mmd(a, b)))
    return float(np.mean(vals)), float(np.std(vals))


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("real_features", a), ("fake_features", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a (N, d) tensor, got {getattr(t, 'shape', type(t))}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"mismatched feature sizes: real d={a.shape[1]}, fake d={b.shape[1]}")


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i : i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 0 distance to itself is the first
    return torch.cat(radii)


def _coverage(query: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = 0
    for i in range(0, query.shape[0], chunk):
        d = torch.cdist(query[i : i + chunk], centers)
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / query.shape[0]


def precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls (k = 3 by default).

    Precision: fraction of generated samples inside at least one real sample's k-NN ball; recall:
    fraction of real samples inside at least one generated sample's ball. Both in [0, 1].
    """
    _check_pair(real_features, fake_features)
    if k < 1 or min(real_features.shape[0], fake_features.shape[0]) <= k:
        raise ValueError(f"precision_recall needs k >= 1 and more than k samples per set; got k={k}")
    r, f = real_features.double(), fake_features.double()
    rr, rf = _knn_radii(r, k, chunk), _knn_radii(f, k, chunk)
    return _coverage(f, r, rr, chunk), _coverage(r, f, rf, chunk)


def evaluate(
    samples: Source,
    reference: Reference | None = None,
    features: Features = "inception",
    metrics: Iterable[str] = ("fid",),
    *,
    is_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    seed: int = 0,
    save_stats_to: str | Path | None = None,
    **kw: Any,
) -> dict[str, float]:
    """Several metrics in one pass over the samples (features are extracted once).

    Args:
        metrics: any of ``"fid"``, ``"is"``, ``"kid"``, ``"pr"`` (precision/recall). KID and P/R need
            reference images (not only statistics).
        save_stats_to: also write the samples' statistics to this ``.npz``.
        **kw: as :func:`extract_features` (``batch_size``, ``device``, ``inception_weights``, ...).

    Returns:
        A dict with ``fid``, ``is_mean``/``is_std``, ``kid_mean``/``kid_std``, ``precision``/``recall``
        for the requested metrics, plus ``n_samples``.
    """
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in ("fid", "is", "kid", "pr")]
    if bad:
        raise ValueError(f"metrics must be among 'fid', 'is', 'kid', 'pr', got {bad}")
    need_ref_feats = "kid" in metrics or "pr" in metrics
    if reference is None and (need_ref_feats or "fid" in metrics):
        raise ValueError("reference is required for fid, kid and pr")
    ex = _pop_extractor(features, kw)
    if _is_stats(samples):
        if metrics != ("fid",):
            raise ValueError("samples given as a statistics file allow only the fid metric")
        fake_st = _reference_stats(samples, ex, kw)
        return {
            "n_samples": float(fake_st.count or 0),
            "fid": fid_from_stats(fake_st, _reference_stats(reference, ex, kw)),
        }
    fake = extract_features(
        samples, ex, keep_features=need_ref_feats, keep_logits="is" in metrics, desc="samples", **kw
    )
    if save_stats_to is not None:
        st = fake.reference()
        _io.save_stats(save_stats_to, st.mu, st.sigma, **st.meta)
    out: dict[str, float] = {"n_samples": float(fake.stats.count)}
    ref_set: FeatureSet | None = None
    if need_ref_feats:
        if _is_stats(reference):
            raise ValueError("kid and pr need reference images, not a statistics file")
        ref_set = extract_features(reference, ex, keep_features=True, desc="reference", **kw)
    if "fid" in metrics:
        ref_stats = ref_set.reference() if ref_set is not None else _reference_stats(reference, ex, kw)
        out["fid"] = fid_from_stats(fake.reference(), ref_stats)
    if "is" in metrics:
        out["is_mean"], out["is_std"] = inception_score(fake.logits, is_splits)
    if "kid" in metrics:
        assert ref_set is not None and ref_set.features is not None and fake.features is not None
        out["kid_mean"], out["kid_std"] = kid(ref_set.features, fake.features, kid_subsets, kid_subset_size, seed)
    if "pr" in metrics:
        assert ref_set is not None and ref_set.features is not None and fake.features is not None
        out["precision"], out["recall"] = precision_recall(ref_set.features, fake.features, pr_k)
    return out
