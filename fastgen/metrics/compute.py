"""FID / FD, Inception Score, KID and precision/recall over images streamed in batches.

A *source* of images is any of: a tensor ``(N, C, H, W)`` (uint8, or float in [-1, 1]); an iterable
of such batches (e.g. a generator drawing from a sampler, so N samples never sit in memory); a path
to a folder of PNG/JPEG images or to an ``.npz`` of images; or a data set name ``"digits:train"``,
``"digits:test"``, ``"digits:all"``. A *reference* for FID is a source, a statistics ``.npz``
(``mu``/``sigma``: fastgen, pytorch-fid, clean-fid, EDM, ADM) or a :class:`ReferenceStats`.

Statistics are float64 running sums (:class:`~fastgen.metrics.stats.FeatureStatistics`, a
torchmetrics ``Metric`` that merges across processes), so memory is O(d^2) in the sample count;
IS, KID and precision/recall (:mod:`fastgen.metrics.scores`) need the features themselves and keep them
(``(N, d)`` float32).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastgen.data.images import check_value_range, normalize_images, to_nchw
from fastgen.metrics import io as _io
from fastgen.metrics.features import FeatureExtractor, get_extractor
from fastgen.metrics.scores import inception_score, kid, precision_recall
from fastgen.metrics.stats import FeatureStatistics, frechet_distance

Source = torch.Tensor | Iterable[torch.Tensor] | str | Path
Reference = Source | _io.ReferenceStats
Features = str | nn.Module | FeatureExtractor


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _normalized(batches: Iterable[Any], value_range: str, name: str, notes: list[str] | None
                ) -> Iterator[torch.Tensor]:
    """Pass each batch through :func:`normalize_images`; under ``"auto"`` the first batch fixes the range."""
    rng = value_range
    for batch in batches:
        if not isinstance(batch, (torch.Tensor, np.ndarray)):
            raise ValueError(f"{name}: batches must be tensors (B, C, H, W), got {type(batch).__name__}")
        if batch.ndim != 4:
            raise ValueError(f"{name}: a batch must be (B, C, H, W), got shape {tuple(batch.shape)}")
        out, used, note = normalize_images(batch, rng, name)
        if notes is not None and note not in notes and (rng == value_range):
            notes.append(note)
        if rng == "auto" and used in ("-1,1", "0,1", "0,255"):  # lock a float range for the later batches
            rng = used
        yield out


def iter_source(
    source: Source, batch_size: int = 64, value_range: str = "auto", notes: list[str] | None = None
) -> tuple[Iterator[torch.Tensor], int | None]:
    """Turn a source into ``(iterator over image batches, total count or None)``.

    Every batch is read by :mod:`fastgen.data.images` (bit depth, ``value_range`` and channels handled
    explicitly); what was done is appended to ``notes`` (one line per distinct conversion).
    """
    _check_batch_size(batch_size)
    check_value_range(value_range)
    name = str(source) if isinstance(source, (str, Path)) else "images"
    if isinstance(source, torch.Tensor):
        if source.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(source.shape)}")
        n = source.shape[0]
        raw = (source[i : i + batch_size] for i in range(0, n, batch_size))
        return _normalized(raw, value_range, name, notes), n
    if isinstance(source, str) and source.startswith("digits:"):
        from fastgen.data import load_digits_split

        split = source.split(":", 1)[1]  # fastgen's own data: [-1, 1] by construction, whatever value_range says
        return iter_source(load_digits_split(split).images, batch_size, "-1,1", notes)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = _io.list_image_files(path)
            return _normalized(_io.iter_folder_batches(path, batch_size, notes), value_range, name, notes), len(files)
        if path.suffix == ".npz":
            if _io.is_stats_file(path):
                raise ValueError(f"{path} holds statistics (mu/sigma), not images; it can only be a FID reference")
            shape, _, _ = _io.npz_image_header(path)
            raw = (torch.from_numpy(np.ascontiguousarray(to_nchw(b, name)[0])) for b in
                   _io.iter_npz_batches(path, batch_size))
            return _normalized(raw, value_range, name, notes), int(shape[0]) if shape else 0
        if not path.exists():
            raise FileNotFoundError(f"no such folder or .npz file: {path}")
        raise ValueError(f"{path}: expected a folder of images, an .npz file or 'digits:<split>'")
    if isinstance(source, Iterable):
        return _normalized(source, value_range, name, notes), None
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
    value_range: str = "auto",
    report: Any = None,
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
        value_range: ``"auto"`` (unambiguous cases only), ``"uint8"``, ``"uint16"``, ``"0,1"``, ``"-1,1"`` or
            ``"0,255"``; see :mod:`fastgen.data.images`.
        report: optional ``callable(str)`` told what the image reader did (ranges, bit depths, channels)
            and warned about small sample counts.

    Raises:
        ValueError: fewer than 2 images, inconsistent feature sizes, bad image values.
    """
    from tqdm.auto import tqdm

    ex = get_extractor(features, inception_weights=inception_weights, resize=resize, device=device, dtype=dtype)
    notes: list[str] = []
    batches, total = iter_source(source, batch_size, value_range, notes)
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
    if report is not None:
        for note in notes:
            report(f"{desc}: {note}")
    _warn_small(stats.count, ex.num_features or stats.num_features or 0, desc, report)
    return FeatureSet(
        stats,
        torch.cat(kept_f) if keep_features else None,
        torch.cat(kept_l) if keep_logits else None,
        ex.metadata(),
    )


def _warn_small(n: int, d: int, desc: str, report: Any = None) -> None:
    """Warn when ``n`` samples cannot give a full-rank ``d x d`` covariance (FD is then strongly biased)."""
    if n <= d:
        msg = (f"{desc}: only {n} images for {d}-dimensional features; the covariance has rank < {d} and the "
               f"Frechet distance is strongly biased (use well over {d}; 10k-50k is conventional for FID)")
        warnings.warn(msg, SmallSampleWarning, stacklevel=3)
        if report is not None:
            report("warning: " + msg)


class SmallSampleWarning(UserWarning):
    """Statistics from fewer samples than feature dimensions (a rank-deficient covariance)."""


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


def _stats_extractor(x: object) -> str | None:
    """The ``extractor`` recorded in statistics (a :class:`ReferenceStats` or a stats ``.npz``), if any."""
    if not _is_stats(x):
        return None
    st = x if isinstance(x, _io.ReferenceStats) else _io.load_stats(x)
    return st.meta.get("extractor") or None


def resolve_features(features: Features | None, *sources: object) -> Features:
    """``features`` if given; else the extractor recorded in the first statistics among ``sources``
    (``"inception"`` or ``"digits"``); else ``"inception"``."""
    if features is not None:
        return features
    for src in sources:
        name = _stats_extractor(src)
        if name is not None:
            for known in ("digits", "inception"):  # "fastgen-digits-classifier", "inception-v3-tf-2015-12-05"
                if known in name:
                    return known
            raise ValueError(f"statistics {src!s} were computed with extractor {name!r}; pass features= explicitly")
    return "inception"


def fid(samples: Reference, reference: Reference, features: Features | None = None, **kw: Any) -> float:
    """FID (Inception features) or, with ``features="digits"`` / a module, the FD in that space.

    Args:
        samples: images or statistics (see module docstring).
        reference: images, a statistics ``.npz`` or :class:`ReferenceStats`.
        features: ``"inception"``, ``"digits"``, an ``nn.Module`` or an extractor; None (default): the
            ``extractor`` recorded in a statistics reference (e.g. ``digits-test.npz`` -> digits), else Inception.
        **kw: ``batch_size``, ``device``, ``inception_weights``, ``resize``, ``progress``, ``max_samples``,
            ``value_range``, ``report``.
    """
    ex = _pop_extractor(resolve_features(features, reference, samples), kw)
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


def evaluate(
    samples: Source,
    reference: Reference | None = None,
    features: Features | None = None,
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
    if "kid" in metrics and (not isinstance(kid_subset_size, int) or kid_subset_size < 2):
        raise ValueError(f"kid_subset_size (--kid-subset-size) must be an int >= 2, got {kid_subset_size!r}")
    ex = _pop_extractor(resolve_features(features, reference, samples), kw)
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
        n_min = min(ref_set.features.shape[0], fake.features.shape[0])
        if n_min < kid_subset_size:
            raise ValueError(
                f"kid_subset_size (--kid-subset-size) = {kid_subset_size} exceeds the smaller set "
                f"({fake.features.shape[0]} samples, {ref_set.features.shape[0]} reference); use at most {n_min}"
            )
        out["kid_mean"], out["kid_std"] = kid(ref_set.features, fake.features, kid_subsets, kid_subset_size, seed)
    if "pr" in metrics:
        assert ref_set is not None and ref_set.features is not None and fake.features is not None
        out["precision"], out["recall"] = precision_recall(ref_set.features, fake.features, pr_k)
    return out
