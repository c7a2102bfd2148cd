"""Frechet distance and streaming statistics: oracles, scipy cross-check, merging, errors."""

import numpy as np
import pytest
import scipy.linalg
import torch

from fastgen.metrics import FeatureStatistics, frechet_distance


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _fd_sqrtm(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)  # scipy 1.18 API: never pass disp
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [2, 16, 64])
def test_fd_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    ref = _fd_sqrtm(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(ref, rel=1e-6)
    # tensors (float32 input is promoted to float64) give the same number
    got_t = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2))
    assert got_t == pytest.approx(ref, rel=1e-6)


def test_fd_closed_form_diagonal_and_commuting():
    rng = np.random.default_rng(0)
    d = 32
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    oracle = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(oracle, rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenvectors: commuting covariances
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(oracle, rel=1e-9)
    # isotropic: ||dmu||^2 + d (s1 - s2)^2 with standard deviations s1, s2
    iso = frechet_distance(mu1, 4.0 * np.eye(d), mu2, 0.25 * np.eye(d))
    assert iso == pytest.approx(((mu1 - mu2) ** 2).sum() + d * (2.0 - 0.5) ** 2, rel=1e-12)


def test_fd_invariances():
    rng = np.random.default_rng(1)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    base = frechet_distance(mu1, s1, mu2, s2)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(base, rel=1e-9)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(base, rel=1e-9)
    shift = rng.standard_normal(d)
    # translating one side only adds ||shift||^2 when the means coincide
    assert frechet_distance(mu1 + shift, s1, mu1, s2) == pytest.approx(
        frechet_distance(mu1, s1, mu1, s2) + (shift**2).sum(), rel=1e-9
    )


def test_streaming_equals_one_shot_and_merge_equals_union():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3, 12) + 2.0
    ref_mu, ref_cov = x.numpy().mean(0), np.cov(x.numpy(), rowvar=False)
    one = FeatureStatistics(12)
    one.update(x)
    for splits in ([500], [1, 499], [100, 150, 250], [7] * 71 + [3]):
        st = FeatureStatistics()
        for chunk in torch.split(x, splits):
            st.update(chunk)
        assert st.count == 500
        np.testing.assert_allclose(st.mu.numpy(), ref_mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st.sigma.numpy(), ref_cov, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(st.sigma.numpy(), one.sigma.numpy(), rtol=1e-11, atol=1e-12)
    a, b, c = FeatureStatistics(), FeatureStatistics(), FeatureStatistics()
    a.update(x[:123])
    b.update(x[123:400])
    c.update(x[400:])
    merged = a.merge(b).merge(c)
    np.testing.assert_allclose(merged.mu.numpy(), ref_mu, rtol=1e-12)
    np.testing.assert_allclose(merged.sigma.numpy(), ref_cov, rtol=1e-11, atol=1e-12)
    # torchmetrics' own merge (the distributed reduction, a sum) gives the same
    d, e = FeatureStatistics(12), FeatureStatistics(12)
    d.update(x[:250])
    e.update(x[250:])
    d.merge_state(e)
    np.testing.assert_allclose(d.sigma.numpy(), ref_cov, rtol=1e-11, atol=1e-12)


def test_errors():
    st = FeatureStatistics()
    st.update(torch.randn(1, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = st.sigma
    with pytest.raises(ValueError, match="mismatched feature sizes"):
        st.update(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        st.update(torch.randn(4))
    with pytest.raises(ValueError, match="NaN"):
        st.update(torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2 must have shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="numpy array or a torch.Tensor"):
        frechet_distance([0.0], np.eye(1), np.zeros(1), np.eye(1))


def test_distributed_sync_sums_the_ranks():
    """Two simulated ranks: torchmetrics' sync (a gather + sum) gives the statistics of the union."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    rank0, rank1 = FeatureStatistics(5), FeatureStatistics(5)
    rank0.update(x[:120])
    rank1.update(x[120:])
    other = {name: getattr(rank1, name) for name in ("features_sum", "features_cov_sum", "num_samples")}

    def gather(t, group=None):  # what all_gather returns on rank 0
        name = next(n for n, v in other.items() if v.shape == t.shape and v.dtype == t.dtype)
        return [t, other[name]]

    mu, sigma, n = rank0.global_stats(dist_sync_fn=gather, distributed_available=lambda: True)
    assert n == 300
    np.testing.assert_allclose(mu.numpy(), x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-11, atol=1e-13)
    assert rank0.count == 120  # local state restored afterwards, accumulation can continue
