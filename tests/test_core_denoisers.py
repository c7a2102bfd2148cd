"""The exact denoisers (Gaussian mixture, empirical) against closed forms, Monte Carlo and autograd,
plus the EDM preconditioning and the bad-input contract of every denoiser."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.core.analytic import EmpiricalDenoiser, GaussianMixtureDenoiser
from fastgen.core.denoiser import EDMDenoiser, sigma_batch
from fastgen.data.toy import random_mixture, ring_mixture


def _random_covs(k: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = 0.4 * torch.randn(k, d, d, generator=g, dtype=torch.float64)
    return a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=torch.float64)


def _general_mixture(d: int = 3, k: int = 4, seed: int = 0) -> GaussianMixtureDenoiser:
    mix = random_mixture(d, k, seed=seed)
    return GaussianMixtureDenoiser(mix.weights, mix.means, covs=_random_covs(k, d, seed))


def _closed_form_general(den: GaussianMixtureDenoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Textbook formula, one sample and one component at a time (independent of the batched code)."""
    out = []
    d = den.dim
    for xi in x.double():
        logits, means = [], []
        for w, mu, cov in zip(den.weights, den.means, den.covs):
            c = cov + sigma**2 * torch.eye(d, dtype=torch.float64)
            diff = xi - mu
            sol = torch.linalg.solve(c, diff)
            logits.append(math.log(w) - 0.5 * torch.logdet(c) - 0.5 * diff @ sol)
            means.append(mu + cov @ sol)
        wk = torch.softmax(torch.stack(logits), 0)
        out.append((wk[:, None] * torch.stack(means)).sum(0))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# Gaussian mixture: closed forms
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.05, 0.7, 12.0])
def test_isotropic_and_general_formulas_agree(sigma: float) -> None:
    mix = random_mixture(4, 5, seed=3)
    iso = GaussianMixtureDenoiser(mix.weights, mix.means, stds=mix.stds)
    covs = mix.stds[:, None, None] ** 2 * torch.eye(4, dtype=torch.float64)
    gen = GaussianMixtureDenoiser(mix.weights, mix.means, covs=covs)
    x = mix.sample(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[0]
    x = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(iso(x, sigma), gen(x, sigma), rtol=0, atol=1e-12)
    torch.testing.assert_close(iso.log_prob(x, sigma), gen.log_prob(x, sigma), rtol=0, atol=1e-10)


def test_general_covariance_matches_textbook_formula() -> None:
    den = _general_mixture()
    x = 2 * torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for sigma in (0.1, 1.0, 5.0):
        torch.testing.assert_close(den(x, sigma), _closed_form_general(den, x, sigma), rtol=0, atol=1e-12)


def test_single_gaussian_is_affine_shrinkage() -> None:
    mu, c, sigma = torch.tensor([[1.0, -2.0]], dtype=torch.float64), 0.3, 0.8
    den = GaussianMixtureDenoiser(torch.ones(1), mu, stds=torch.tensor([c], dtype=torch.float64))
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = mu + c**2 / (c**2 + sigma**2) * (x - mu)
    torch.testing.assert_close(den(x, sigma), expected, rtol=0, atol=1e-14)
    # log p_sigma of N(mu, (c^2 + sigma^2) I)
    var = c**2 + sigma**2
    logp = -0.5 * ((x - mu) ** 2).sum(1) / var - math.log(2 * math.pi * var)
    torch.testing.assert_close(den.log_prob(x, sigma), logp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("general", [False, True])
def test_mixture_matches_monte_carlo_posterior_mean(general: bool) -> None:
    """D(x, sigma) = E[x0 | x0 + sigma eps = x]: sample x0 ~ p, weight by N(x; x0, sigma^2 I)."""
    d, sigma, n = 3, 1.0, 400_000
    mix = random_mixture(d, 4, seed=5)
    if general:
        covs = _random_covs(4, d, seed=5)
        den = GaussianMixtureDenoiser(mix.weights, mix.means, covs=covs)
        g = torch.Generator().manual_seed(11)
        labels = torch.multinomial(mix.weights, n, replacement=True, generator=g)
        chol = torch.linalg.cholesky(covs)[labels]
        z = torch.randn(n, d, 1, generator=g, dtype=torch.float64)
        x0 = mix.means[labels] + (chol @ z)[..., 0]
    else:
        den = mix.denoiser()
        x0 = mix.sample(n, generator=torch.Generator().manual_seed(11), dtype=torch.float64)[0]
    # query points: noisy versions of data (where the posterior is well sampled)
    g = torch.Generator().manual_seed(12)
    xq = mix.sample(6, generator=g, dtype=torch.float64)[0]
    xq = xq + sigma * torch.randn(6, d, generator=g, dtype=torch.float64)
    logw = -0.5 * torch.cdist(xq, x0) ** 2 / sigma**2  # (6, n)
    w = torch.softmax(logw, dim=1)
    ess = 1 / (w**2).sum(1)
    assert float(ess.min()) > 2_000  # the estimate is well sampled
    mc = w @ x0
    exact = den(xq, sigma)
    rel = (mc - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(rel.max()) < 0.01, rel


def test_mixture_weights_sum_to_one_and_labels_select_a_component() -> None:
    mix = ring_mixture(weights="imbalanced")
    den = mix.denoiser()
    assert float(den.weights.sum()) == pytest.approx(1.0, abs=1e-15)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(8)
    out = den(x, 0.5, class_labels=labels)
    for k in range(8):
        single = mix.conditional(k).denoiser()
        torch.testing.assert_close(out[k : k + 1], single(x[k : k + 1], 0.5), rtol=0, atol=1e-14)


@pytest.mark.parametrize("general", [False, True])
def test_score_is_autograd_gradient_of_log_density(general: bool) -> None:
    den = _general_mixture() if general else random_mixture(3, 4, seed=1).denoiser()
    x = 2 * torch.randn(32, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for sigma in (0.05, 0.5, 4.0):
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(den.log_prob(xr, sigma).sum(), xr)
        score = (den(x, sigma) - x) / sigma**2
        assert float((score - grad).abs().max()) < 1e-6 * max(1.0, float(grad.abs().max()))


def test_mixture_limits() -> None:
    mix = ring_mixture(weights="imbalanced")
    den = mix.denoiser()
    # sigma -> 0 near a mode: D(x) -> x
    x = mix.means[:3] + 0.05
    assert float((den(x, 1e-4) - x).abs().max()) < 1e-6
    # sigma -> inf: D -> sum_k pi_k mu_k
    mean = (mix.weights[:, None] * mix.means).sum(0)
    xs = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float((den(xs, 1e6) - mean).abs().max()) < 1e-6
    assert float(mean.norm()) > 0.5  # imbalanced: the limit is not trivially 0


def test_mixture_per_sample_sigma_equals_scalar_sigma() -> None:
    den = ring_mixture().denoiser()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = torch.tensor([0.1, 1.0, 3.0, 30.0], dtype=torch.float64)
    out = den(x, sig)
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], den(x[i : i + 1], float(sig[i])), rtol=0, atol=1e-14)


def test_mixture_accepts_image_shaped_input_and_keeps_dtype() -> None:
    mix = random_mixture(4, 3, seed=0)
    den = mix.denoiser()
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = den(x, 0.3)
    assert out.shape == x.shape and out.dtype == torch.float32
    ref = den(x.reshape(5, 4).double(), 0.3)
    torch.testing.assert_close(out.reshape(5, 4).double(), ref, atol=1e-6, rtol=0)


def test_rectified_flow_closed_form_agrees() -> None:
    """Card formula E[x1 | x_t] = mu + t s^2 (x_t - t mu) / v_t (single Gaussian) equals D(x_t/t, (1-t)/t)."""
    mu, s = torch.tensor([[0.5, -1.0]], dtype=torch.float64), 0.4
    den = GaussianMixtureDenoiser(torch.ones(1), mu, stds=torch.tensor([s], dtype=torch.float64))
    xt = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.2, 0.5, 0.9):
        vt = (1 - t) ** 2 + t**2 * s**2
        ex1 = mu + t * s**2 * (xt - t * mu) / vt
        ex0 = (1 - t) * (xt - t * mu) / vt
        d = den(xt / t, (1 - t) / t)
        torch.testing.assert_close(d, ex1, rtol=0, atol=1e-12)
        v1, v2 = (d - xt) / (1 - t), (xt - (xt - t * d) / (1 - t)) / t
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-12)  # the two velocity formulas
        torch.testing.assert_close((xt - t * d) / (1 - t), ex0, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Empirical denoiser
# ------------------------------------------------------------------------------------------------


def test_empirical_returns_nearest_point_at_small_sigma() -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.randn(50, 6, generator=g, dtype=torch.float64)
    den = EmpiricalDenoiser(data)
    idx = torch.tensor([3, 17, 42])
    x = data[idx] + 0.01 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    out = den(x, 1e-3)
    nearest = torch.cdist(x, data).argmin(1)
    assert torch.equal(nearest, idx)
    torch.testing.assert_close(out, data[idx], rtol=0, atol=1e-12)
    # sigma -> inf: the data mean
    torch.testing.assert_close(den(x, 1e5), data.mean(0).expand(3, 6), rtol=0, atol=1e-6)


def test_empirical_with_bandwidth_is_the_equal_weight_mixture() -> None:
    data = torch.randn(20, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    emp = EmpiricalDenoiser(data, bandwidth=0.25, chunk=7)  # chunking must not matter
    gmm = GaussianMixtureDenoiser(torch.ones(20), data, stds=torch.full((20,), 0.25))
    x = 1.5 * torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for sigma in (0.01, 0.3, 3.0):
        torch.testing.assert_close(emp(x, sigma), gmm(x, sigma), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# EDM preconditioning
# ------------------------------------------------------------------------------------------------


def test_edm_denoiser_coefficients() -> None:
    calls = {}

    def net(x_in, c_noise):
        calls["x_in"], calls["c_noise"] = x_in, c_noise
        return torch.ones_like(x_in)

    den = EDMDenoiser(net, sigma_data=0.5)
    x = torch.full((2, 3), 2.0, dtype=torch.float64)
    out = den(x, 1.5)
    sd, s = 0.5, 1.5
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
    c_in = 1 / math.sqrt(s**2 + sd**2)
    torch.testing.assert_close(out, torch.full_like(x, c_skip * 2 + c_out), rtol=0, atol=1e-14)
    torch.testing.assert_close(calls["x_in"], torch.full_like(x, 2 * c_in), rtol=0, atol=1e-14)
    torch.testing.assert_close(calls["c_noise"], torch.full((2,), math.log(s) / 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_data"):
        EDMDenoiser(net, sigma_data=0.0)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error_naming_the_argument() -> None:
    den = ring_mixture().denoiser()
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(3,\)"):
        den(x, torch.ones(2))
    with pytest.raises(ValueError, match="features per sample"):
        den(torch.zeros(3, 5), 1.0)
    with pytest.raises(ValueError, match="class_labels must be in"):
        den(x, 1.0, class_labels=torch.tensor([0, 1, 8]))
    with pytest.raises(ValueError, match="class_labels must be an integer tensor of shape"):
        den(x, 1.0, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x is on meta"):
        den(torch.zeros(3, 2, device="meta"), 1.0)
    with pytest.raises(ValueError, match="x is on meta"):
        EmpiricalDenoiser(torch.zeros(4, 2))(torch.zeros(3, 2, device="meta"), 1.0)
    with pytest.raises(ValueError, match="exactly one of stds"):
        GaussianMixtureDenoiser(torch.ones(2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"covs must have shape \(2, 2, 2\)"):
        GaussianMixtureDenoiser(torch.ones(2), torch.zeros(2, 2), covs=torch.eye(2))
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixtureDenoiser(torch.ones(3), torch.zeros(2, 2), stds=torch.ones(2))
    with pytest.raises(ValueError, match="bandwidth must be >= 0"):
        EmpiricalDenoiser(torch.zeros(4, 2), bandwidth=-1.0)
    with pytest.raises(ValueError, match="data must have shape"):
        EmpiricalDenoiser(torch.zeros(4))
    assert sigma_batch(0.5, x).shape == (3,)
