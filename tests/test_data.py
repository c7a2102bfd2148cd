"""Offline data: the scikit-learn digits split and the Gaussian-mixture families."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.data import (
    GaussianMixture,
    grid_mixture,
    load_digits_split,
    random_mixture,
    ring_mixture,
)


def _rows(images: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for r in images.reshape(images.shape[0], -1).tolist())


def test_digits_shapes_values_classes_and_split() -> None:
    from sklearn.datasets import load_digits

    train, test, full = load_digits_split("train"), load_digits_split("test"), load_digits_split("all")
    assert (len(train), len(test), len(full)) == (898, 899, 1797)
    assert full.images.shape == (1797, 1, 8, 8) and full.images.dtype == torch.float32
    assert full.labels.dtype == torch.int64
    # x / 8 - 1 of integers 0..16: back-transformed values are exactly those integers
    raw = (full.images + 1) * 8
    assert torch.equal(raw, raw.round()) and float(raw.min()) == 0 and float(raw.max()) == 16
    assert float(full.images.min()) == -1.0 and float(full.images.max()) == 1.0
    assert sorted(full.labels.unique().tolist()) == list(range(10))
    # the two halves partition the bundled set (same images, as a multiset) ...
    bunch = load_digits()
    assert _rows(full.images) == _rows(torch.from_numpy(bunch.images).float() / 8 - 1)
    assert torch.bincount(full.labels).tolist() == torch.bincount(torch.from_numpy(bunch.target)).tolist()
    # ... and are stratified: each class is split about in half
    tr, te = torch.bincount(train.labels, minlength=10), torch.bincount(test.labels, minlength=10)
    assert int((tr - te).abs().max()) <= 1
    # fixed split: the same call gives the same halves
    again = load_digits_split("train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    with pytest.raises(ValueError, match="split must be 'train', 'test' or 'all'"):
        load_digits_split("val")


def test_ring_mixture_geometry_and_weights() -> None:
    ring = ring_mixture()
    assert ring.num_modes == 8 and ring.dim == 2
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((8,), 3.0, dtype=torch.float64))
    angles = torch.atan2(ring.means[:, 1], ring.means[:, 0]) % (2 * math.pi)
    torch.testing.assert_close(angles, torch.arange(8, dtype=torch.float64) * math.pi / 4, rtol=0, atol=1e-12)
    assert torch.all(ring.stds == 0.15)
    torch.testing.assert_close(ring.weights, torch.full((8,), 0.125, dtype=torch.float64))
    imb = ring_mixture(weights="imbalanced")
    ratios = imb.weights[:-1] / imb.weights[1:]
    torch.testing.assert_close(ratios, torch.full((7,), 20 ** (1 / 7), dtype=torch.float64))  # 0.4 -> 0.02
    assert float(imb.weights.sum()) == pytest.approx(1.0, abs=1e-15)
    custom = ring_mixture(4, weights=torch.tensor([1.0, 1.0, 2.0, 4.0]))
    torch.testing.assert_close(custom.weights, torch.tensor([0.125, 0.125, 0.25, 0.5], dtype=torch.float64))


def test_grid_and_random_mixtures() -> None:
    grid = grid_mixture(side=3, spacing=2.0)
    assert grid.num_modes == 9
    assert sorted(set(grid.means[:, 0].tolist())) == [-2.0, 0.0, 2.0]
    torch.testing.assert_close(grid.means.mean(0), torch.zeros(2, dtype=torch.float64))
    a, b, c = random_mixture(5, 4, seed=7), random_mixture(5, 4, seed=7), random_mixture(5, 4, seed=8)
    assert torch.equal(a.means, b.means) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.means, c.means)
    assert a.means.shape == (4, 5) and float(a.stds.min()) >= 0.2 and float(a.stds.max()) <= 0.6


def test_mixture_sampling_statistics_and_log_prob() -> None:
    mix = ring_mixture(weights="imbalanced")
    x, labels = mix.sample(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(labels, minlength=8).double() / len(labels)
    assert float((freq - mix.weights).abs().max()) < 0.005
    resid = x - mix.means[labels]
    assert abs(float(resid.std()) - 0.15) < 0.002
    torch.testing.assert_close(x.mean(0), (mix.weights[:, None] * mix.means).sum(0), rtol=0, atol=0.02)
    # same generator, same samples
    x2, _ = mix.sample(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(x, x2)
    # log p_0 agrees with the denoiser's log p_sigma at sigma = 0 and with a direct formula
    pts = x[:50]
    torch.testing.assert_close(mix.log_prob(pts), mix.denoiser().log_prob(pts, 0.0), rtol=0, atol=1e-10)
    k = 0
    single = mix.conditional(k)
    direct = -((pts - mix.means[k]) ** 2).sum(1) / (2 * 0.15**2) - math.log(2 * math.pi * 0.15**2)
    torch.testing.assert_close(single.log_prob(pts), direct, rtol=0, atol=1e-10)


def test_mixture_bad_input() -> None:
    with pytest.raises(ValueError, match="weights must be non-negative and sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="stds must be positive"):
        GaussianMixture(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"means must have shape \(K, d\)"):
        GaussianMixture(torch.ones(1), torch.zeros(2), torch.ones(1))
    with pytest.raises(ValueError, match="weights must be 'uniform', 'imbalanced' or a tensor"):
        ring_mixture(weights="skewed")
    with pytest.raises(ValueError, match="num_modes must be >= 1"):
        ring_mixture(0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        ring_mixture().sample(0)
