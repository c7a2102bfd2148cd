"""The shipped digits classifier and FD_digits: accuracy, calibration orderings, torchmetrics parity."""

import json

import pytest
import torch

from fastgen.data import load_digits_split
from fastgen.metrics import digits_fd, digits_features, fid
from fastgen.metrics.digits import DIGITS_WEIGHTS, digits_accuracy, load_digits_classifier
from fastgen.metrics.inception import file_sha256


@pytest.fixture(scope="module")
def train():
    return load_digits_split("train")


def test_shipped_weights_card_and_accuracy():
    card = json.loads(DIGITS_WEIGHTS.with_suffix(".json").read_text())
    assert card["sha256"] == file_sha256(DIGITS_WEIGHTS)
    assert DIGITS_WEIGHTS.stat().st_size < 300_000
    acc = digits_accuracy(load_digits_classifier(), "test")
    assert acc == pytest.approx(card["test_accuracy"], abs=1e-6)
    assert acc >= 0.95


def test_features_shape_and_reference_caching(train):
    f = digits_features(train.images[:10])
    assert f.shape == (10, 64) and f.dtype == torch.float32
    # (N, 64) and (N, 8, 8) layouts give the same features
    torch.testing.assert_close(digits_features(train.images[:10].reshape(10, 64)), f)
    assert digits_fd(train.images, "train") == pytest.approx(0.0, abs=1e-8)


def test_fd_orderings(train):
    gen = torch.Generator().manual_seed(0)
    x, y = train.images, train.labels
    real = digits_fd(x)
    noisy = [digits_fd(x + s * torch.randn(x.shape, generator=gen)) for s in (0.05, 0.1, 0.2, 0.4)]
    missing = digits_fd(x[y < 5])  # mode drop: digits 0-4 only
    single = digits_fd(x[y == 3])
    uniform = digits_fd(torch.rand(x.shape, generator=gen) * 2 - 1)
    assert real < noisy[0] < noisy[1] < noisy[2] < noisy[3] < missing < single < uniform
    assert missing > 20 * real
    # 1/N bias: fewer real samples, larger FD
    assert digits_fd(x[:200]) > 1.5 * real


def test_same_fd_as_torchmetrics_with_same_feature_network(train):
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = load_digits_classifier()
    test = load_digits_split("test")
    fake = train.images[train.labels != 7]
    tm = FrechetInceptionDistance(feature=net)
    tm.update(test.images, real=True)
    tm.update(fake, real=False)
    expected = float(tm.compute())  # torchmetrics casts its float64 result to float32
    assert fid(fake, test.images, features=net, progress=False) == pytest.approx(expected, rel=1e-6)
    assert digits_fd(fake) == pytest.approx(expected, rel=1e-6)
    # the named feature space and the statistics path agree too
    assert fid(fake, "digits:test", features="digits", batch_size=100, progress=False) == pytest.approx(
        expected, rel=1e-6
    )


def test_bad_inputs(train):
    with pytest.raises(ValueError, match="1 channel"):
        digits_fd(train.images.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        digits_fd((train.images + 1) * 8)  # 0..16 convention
    with pytest.raises(ValueError, match="at least 2"):
        digits_fd(train.images[:1])
    with pytest.raises(ValueError, match="shape"):
        digits_fd(torch.zeros(4, 1, 28, 28))
    with pytest.raises(ValueError, match="reference"):
        digits_fd(train.images, reference="validation")
    nan = train.images[:4].clone()
    nan[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        digits_fd(nan)
    with pytest.raises(ValueError, match="float"):
        digits_fd(torch.zeros(4, 1, 8, 8, dtype=torch.int64))


def test_streaming_from_an_endless_sampler(train):
    from fastgen.metrics import FrechetDistance, extract_features

    drawn = []

    def sampler():  # an endless generator, as a sampler loop would be
        i = 0
        while True:
            drawn.append(i)
            yield train.images[(torch.arange(128) + 128 * i) % len(train)]
            i += 1

    fs = extract_features(sampler(), "digits", max_samples=600, progress=False)
    assert fs.stats.count == 600 and len(drawn) == 5  # ceil(600 / 128) batches, none wasted
    metric = FrechetDistance("digits:test", features="digits", progress=False)
    for batch in torch.split(train.images, 100):
        metric.update(batch)
    # float32 features of a batch of 100 vs one of 898 may differ in the last bit (BLAS blocking, thread
    # count), which moves FD by ~1e-9 relative; the float64 statistics themselves are exact (test_stats).
    assert metric.compute() == pytest.approx(digits_fd(train.images), rel=1e-6)
    metric.reset()
    metric.update(train.images[train.labels == 3])
    # The reference side still differs in batching (FrechetDistance extracts digits:test in batches of 64,
    # digits_reference_stats in one pass), so the same float32 last-bit argument gives 1e-6, not 1e-9.
    assert metric.compute() == pytest.approx(digits_fd(train.images[train.labels == 3]), rel=1e-6)
