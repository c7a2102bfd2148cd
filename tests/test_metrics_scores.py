"""Inception Score, KID and precision/recall against closed forms and brute-force references."""

import math

import numpy as np
import pytest
import torch

from fastgen.metrics import inception_score, kid, precision_recall


def test_inception_score_closed_forms():
    k = 10
    # confident and uniformly spread over k classes: IS = k; all identical predictions: IS = 1
    confident = torch.eye(k).repeat(20, 1) * 50.0
    mean, std = inception_score(confident, splits=2)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    assert inception_score(torch.randn(1, k).repeat(40, 1), splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    # two classes, p(y|x) = (p, 1-p) for half, (1-p, p) for the other half: IS = exp(log 2 - H(p))
    p = 0.8
    pair = [[math.log(p), math.log(1 - p)], [math.log(1 - p), math.log(p)]]
    logits = torch.tensor(pair, dtype=torch.float64).repeat(10, 1)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert inception_score(logits, splits=1)[0] == pytest.approx(math.exp(math.log(2) - h), rel=1e-12)


def test_inception_score_population_std():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(100, 7, generator=gen) * 3
    mean, std = inception_score(logits, splits=5)
    per_split = []
    for i in range(5):
        pr = torch.softmax(logits[i * 20 : (i + 1) * 20].double(), 1)
        py = pr.mean(0, keepdim=True)
        per_split.append(float(torch.exp((pr * (pr.log() - py.log())).sum(1).mean())))
    assert mean == pytest.approx(np.mean(per_split), rel=1e-12)
    assert std == pytest.approx(np.std(per_split, ddof=0), rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits[:3], splits=10)


def _mmd_unbiased(x, y):
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m = x.shape[0]
    return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_matches_formula_and_detects_shift():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 8)), rng.standard_normal((60, 8))
    mean, std = kid(torch.from_numpy(x), torch.from_numpy(y), subsets=3, subset_size=60)
    assert mean == pytest.approx(_mmd_unbiased(x, y), rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)
    same = kid(torch.from_numpy(x), torch.from_numpy(y), subsets=20, subset_size=40)[0]
    shifted = kid(torch.from_numpy(x), torch.from_numpy(y + 1.0), subsets=20, subset_size=40)[0]
    assert abs(same) < 0.2 * shifted
    with pytest.raises(ValueError, match="subset_size"):
        kid(torch.from_numpy(x), torch.from_numpy(y), subset_size=100)
    with pytest.raises(ValueError, match="mismatched feature sizes"):
        kid(torch.zeros(5, 3), torch.zeros(5, 4), subset_size=5)


def _pr_bruteforce(real, fake, k):
    def radii(a):
        d = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def cov(q, c, r):
        d = np.linalg.norm(q[:, None] - c[None], axis=-1)
        return float((d <= r[None]).any(axis=1).mean())

    return cov(fake, real, radii(real)), cov(real, fake, radii(fake))


def test_precision_recall_bruteforce_and_limits():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((80, 5))
    fake = 0.5 * rng.standard_normal((70, 5)) + 0.7  # a narrower, shifted generator: precise, low recall
    p, r = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, chunk=16)
    bp, br = _pr_bruteforce(real, fake, 3)
    assert (p, r) == (pytest.approx(bp), pytest.approx(br))
    assert p > r
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(real), k=3) == (1.0, 1.0)
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(real + 100.0), k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than k samples"):
        precision_recall(torch.zeros(3, 2), torch.zeros(3, 2), k=3)
