"""fastgen.metrics.coverage against closed forms: k-NN precision/recall, FD to teacher, diversity, t-intervals."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fastgen.metrics.coverage import class_diversity, fd_between, fd_to_teacher, knn_precision_recall, mean_ci


def _gauss(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_clouds_give_one_and_fd_zero():
    x = _gauss(300, 5, 0)
    pr = knn_precision_recall(x.clone(), x, k=3)
    assert pr == {"precision": 1.0, "recall": 1.0}  # each point is at distance 0 from its copy
    assert abs(fd_between(x, x.clone(), features="pixels")) < 1e-10  # float64 statistics


def test_two_samples_of_one_gaussian():
    a, b = _gauss(3000, 2, 1), _gauss(3000, 2, 2)
    # FD bias of two independent N=3000 samples in d=2 is O(d/N) ~ 1e-3
    assert fd_between(a, b, features="pixels") < 0.01
    pr = knn_precision_recall(a, b, k=3)
    # same density: a new point misses every k=3 ball only in the sparse tails (a few per cent at N=3000)
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9


def test_point_mass_on_the_data():
    real = _gauss(400, 3, 3)
    fake = real[7:8].repeat(50, 1)  # every generated sample equals one data point
    pr = knn_precision_recall(fake, real, k=3)
    assert pr["precision"] == 1.0
    assert pr["recall"] == pytest.approx(1 / 400, abs=1e-15)  # radius 0: covers only that point
    off = knn_precision_recall(real.mean(0, keepdim=True).repeat(50, 1), real, k=3)
    assert off["recall"] == 0.0


def test_disjoint_supports():
    real = _gauss(200, 4, 4)
    pr = knn_precision_recall(real + 100.0, real, k=3)
    assert pr == {"precision": 0.0, "recall": 0.0}


@pytest.mark.parametrize("k,expected", [(1, (0.4, 0.8)), (2, (0.4, 1.0))])
def test_hand_computed_1d(k, expected):
    # real radii (k=1): 1,1,1,1,7; fake radii: 2,2,1,1,1. Precision: 0.5, 2.5 lie in real balls, 20-22 do not
    # (10's ball is [3, 17]) -> 2/5. Recall: 0..3 lie in 0.5's or 2.5's ball [-1.5, 4.5]; 10 in none -> 4/5.
    # k=2: real radii 2,1,1,2,8 (precision 2/5 again); fake 0.5's radius is 19.5 and covers all of real -> 1.
    real = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0]).reshape(5, 1)
    fake = torch.tensor([0.5, 2.5, 20.0, 21.0, 22.0]).reshape(5, 1)
    pr = knn_precision_recall(fake, real, k=k, chunk=2)  # chunk smaller than N exercises the batching
    assert (pr["precision"], pr["recall"]) == expected


def test_chunking_does_not_change_the_answer():
    a, b = _gauss(257, 6, 5), _gauss(190, 6, 6) * 1.3
    assert knn_precision_recall(a, b, k=3, chunk=7) == knn_precision_recall(a, b, k=3, chunk=4096)


def test_image_shaped_input_is_flattened():
    a, b = _gauss(60, 64, 7), _gauss(60, 64, 8)
    assert knn_precision_recall(a.reshape(60, 1, 8, 8), b.reshape(60, 1, 8, 8)) == knn_precision_recall(a, b)


def test_fd_to_teacher_and_floor():
    t, t2, s = _gauss(500, 3, 9), _gauss(500, 3, 10), _gauss(500, 3, 11) + 1.0
    out = fd_to_teacher(s, t, t2, features="pixels")
    assert out["fd_to_teacher"] == pytest.approx(fd_between(s, t, "pixels"), rel=1e-12)
    assert out["floor"] == pytest.approx(fd_between(t2, t, "pixels"), rel=1e-12)
    assert out["excess"] == pytest.approx(out["fd_to_teacher"] - out["floor"], rel=1e-12)
    # a mean shift of 1 in each of 3 dims adds |dmu|^2 = 3 to FD; the floor is the O(d/N) bias
    assert out["floor"] < 0.05 and abs(out["fd_to_teacher"] - 3.0) < 0.5


def test_class_diversity_hand_example():
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    out = class_diversity(x, labels=[0, 0, 1, 1, 1, 2])
    # class 0: unbiased std of (0, 2) is sqrt(2) per pixel; class 1: 0; class 2 (one sample) skipped
    assert out["per_class"] == pytest.approx({0: math.sqrt(2), 1: 0.0}, rel=1e-12)
    assert out["diversity"] == pytest.approx(math.sqrt(2) / 2, rel=1e-12)
    assert out["counts"] == {0: 2, 1: 3, 2: 1}


def test_class_diversity_digits_classifier_labels():
    from fastgen.data import load_digits_split
    from fastgen.metrics.digits import digits_logits

    x = load_digits_split("test").images[:200]
    auto = class_diversity(x)
    given = class_diversity(x, labels=digits_logits(x).argmax(1))
    assert auto["diversity"] == given["diversity"]
    assert 0.1 < auto["diversity"] < 1.0  # real digits in [-1, 1] vary within a class


@pytest.mark.parametrize("vals", [[1.0, 2.0, 4.0], [0.3, 0.31, 0.29, 0.35, 0.2]])
def test_mean_ci_matches_scipy(vals):
    m, lo, hi = mean_ci(vals)
    ref_lo, ref_hi = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=stats.sem(vals))
    assert m == pytest.approx(np.mean(vals), rel=1e-12)
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), rel=1e-12)
    assert mean_ci([2.5]) == (2.5, 2.5, 2.5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: knn_precision_recall(torch.zeros(10, 2), torch.zeros(10, 2), k=0), "k must be"),
        (lambda: knn_precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3), "more than k"),
        (lambda: knn_precision_recall(torch.zeros(10, 2), torch.zeros(10, 3)), "mismatched"),
        (lambda: knn_precision_recall(torch.zeros(10, 2), torch.zeros(10, 2), features="inception"), "features"),
        (lambda: class_diversity(torch.zeros(4, 2), labels=[0, 1]), "labels"),
        (lambda: mean_ci([]), "values"),
        (lambda: mean_ci([1.0, 2.0], confidence=1.5), "confidence"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
