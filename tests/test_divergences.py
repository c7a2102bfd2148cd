"""f-divergence registry: h(r) = r^2 f''(r) by autograd, f(1) = 0, shapes, monotonicity, alpha family,
and the ratio normalisation chain (clamps, log-sigma bins, batch-mean h, pseudo-target gradient)."""

from __future__ import annotations

import pytest
import torch

from fastgen.distill import divergences
from fastgen.distill.fdistill import dmd_gradient, pseudo_target_loss
from fastgen.distill.ratio import RatioBins, logit_to_ratio, normalise_h

R_GRID = torch.tensor([0.1, 0.2, 0.5, 0.9, 1.0, 1.7, 3.0, 7.5, 20.0], dtype=torch.float64)
ALL = [divergences.get(n) for n in divergences.NAMES] + [
    divergences.alpha(a) for a in (-1.0, 0.0, 0.3, 0.5, 1.0, 2.0)
]


def _h_autograd(div: divergences.Divergence, r: torch.Tensor) -> torch.Tensor:
    out = []
    for ri in r:
        x = ri.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(div.f(x), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1, x)
        out.append(ri**2 * d2)
    return torch.stack(out)


@pytest.mark.parametrize("div", ALL, ids=lambda d: d.name)
def test_h_equals_r2_fpp_by_autograd(div):
    expected = _h_autograd(div, R_GRID)
    torch.testing.assert_close(div.h(R_GRID), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("div", ALL, ids=lambda d: d.name)
def test_f_vanishes_at_one_and_h_has_the_shape_of_r(div):
    assert abs(float(div.f(torch.tensor(1.0, dtype=torch.float64)))) < 1e-12
    r = torch.rand(3, 5, dtype=torch.float64) + 0.1
    assert div.h(r).shape == r.shape and div.f(r).shape == r.shape
    assert div.h(torch.tensor(2.0)).shape == ()


def test_table_values():
    r = torch.tensor([0.25, 4.0], dtype=torch.float64)
    expect = {
        "reverse_kl": [1.0, 1.0],
        "softened_reverse_kl": [1 / 1.25, 1 / 5.0],
        "forward_kl": [0.25, 4.0],
        "js": [0.25 / 1.25, 4 / 5.0],
        "hellinger": [0.125, 0.5],
        "jeffreys": [1.25, 5.0],
        "pearson": [0.125, 32.0],
        "neyman": [8.0, 0.5],
    }
    for name, vals in expect.items():
        torch.testing.assert_close(divergences.get(name).h(r), torch.tensor(vals, dtype=torch.float64))


def test_monotonicity_of_h():
    r = torch.linspace(0.1, 20, 50, dtype=torch.float64)
    for name in ("forward_kl", "js", "hellinger", "jeffreys", "pearson"):
        assert (divergences.get(name).h(r).diff() > 0).all(), name
    for name in ("softened_reverse_kl", "neyman"):
        assert (divergences.get(name).h(r).diff() < 0).all(), name
    assert (divergences.get("rkl").h(r) == 1).all()


def test_alpha_family_special_cases():
    r = R_GRID
    torch.testing.assert_close(divergences.alpha(2).f(r), divergences.get("pearson").f(r) / 2)
    torch.testing.assert_close(divergences.alpha(-1).f(r), divergences.get("neyman").f(r) / 2)
    torch.testing.assert_close(divergences.alpha(0.5).h(r), 4 * divergences.get("hellinger").h(r))
    near0, near1 = divergences.alpha(1e-7), divergences.alpha(1 - 1e-7)
    torch.testing.assert_close(near0.f(r), divergences.alpha(0).f(r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(near1.f(r), divergences.alpha(1).f(r), rtol=1e-5, atol=1e-5)


def test_names_aliases_and_errors():
    assert divergences.get("rkl") is divergences.get("reverse_kl")
    assert divergences.get("KL").name == "forward_kl"
    assert divergences.get("alpha:0.5").name == "alpha:0.5"
    with pytest.raises(ValueError, match="unknown divergence 'tv'.*reverse_kl"):
        divergences.get("tv")
    with pytest.raises(ValueError, match="alpha"):
        divergences.get("alpha:abc")


# ----------------------------------------------------------------------------- ratio chain


def test_logit_to_ratio_clamps_and_head_mean():
    logits = torch.tensor([[-50.0, -50.0], [0.0, 2.0], [40.0, 40.0], [-1.0, -3.0]], requires_grad=True)
    r = logit_to_ratio(logits)
    assert not r.requires_grad
    torch.testing.assert_close(r, torch.tensor([0.1, torch.e, 20.0, torch.exp(torch.tensor(-2.0))]))


def test_ratio_bins_update_only_hit_bins_and_normalise():
    bins = RatioBins(0.002, 80.0, num_bins=10, rho=0.5)
    sig = torch.tensor([0.002, 0.0021, 79.0, 80.0])  # first and last bins only
    assert bins.bin_index(sig).tolist() == [0, 0, 9, 9]
    # log-sigma bins: the geometric midpoint is the boundary between bins 4 and 5
    mid = (0.002 * 80.0) ** 0.5
    assert bins.bin_index(torch.tensor([mid * 0.99, mid * 1.01])).tolist() == [4, 5]
    r = torch.tensor([2.0, 4.0, 0.5, 1.5])
    bins.update(r, sig)
    expect = torch.ones(10)
    expect[0] = 0.5 * 1 + 0.5 * 3.0
    expect[9] = 0.5 * 1 + 0.5 * 1.0
    torch.testing.assert_close(bins.means, expect)
    torch.testing.assert_close(bins.normalise(r, sig), r / (expect[[0, 0, 9, 9]] + 1e-6))
    assert "means" in bins.state_dict()


def test_linear_ratio_bins_are_fastgens_raw_sigma_bins():
    from fastgen.core.schedules import karras

    bins = RatioBins(0.002, 80.0, num_bins=10, space="linear")
    # equal width 7.9998 in raw sigma: 8.0 is just past the first boundary, the geometric midpoint is in bin 0
    assert bins.bin_index(torch.tensor([0.002, 7.99, 8.01, 40.0011, 79.99, 80.0])).tolist() == [0, 0, 1, 5, 9, 9]
    assert bins.bin_index(torch.tensor([(0.002 * 80.0) ** 0.5])).tolist() == [0]
    # f-distill's sigma draws (indices 2..998 of a 1000-point Karras grid): 64% land in FastGen's first bin,
    # 1.9% in its last (the card's numbers); log bins hold 4.5%..18% each
    grid = karras(1000, 0.002, 80.0)[:-1].flip(0)[2:999]
    frac = torch.bincount(bins.bin_index(grid), minlength=10).double() / len(grid)
    assert abs(float(frac[0]) - 0.64) < 0.005 and abs(float(frac[9]) - 0.019) < 0.001
    frac_log = torch.bincount(RatioBins(0.002, 80.0, 10).bin_index(grid), minlength=10).double() / len(grid)
    assert 0.04 < float(frac_log.min()) and float(frac_log.max()) < 0.19
    with pytest.raises(ValueError, match="ratio_bin_space"):
        RatioBins(0.002, 80.0, space="sqrt")
    from fastgen.distill import FDistillConfig

    with pytest.raises(ValueError, match="ratio_bin_space"):
        FDistillConfig(sample_shape=(2,), placement="input", ratio_bin_space="sqrt")
    assert FDistillConfig(sample_shape=(2,), placement="input", ratio_bin_space="linear").ratio_bin_space == "linear"


def test_ratio_bins_rho0_gives_unit_bin_means():
    bins = RatioBins(0.01, 10.0, num_bins=4, rho=0.0)
    g = torch.Generator().manual_seed(0)
    sig = torch.exp(torch.empty(256).uniform_(-4.6, 2.3, generator=g))
    r = torch.rand(256, generator=g) * 5 + 0.1
    bins.update(r, sig)
    rn = bins.normalise(r, sig)
    idx = bins.bin_index(sig)
    for k in idx.unique():
        assert abs(float(rn[idx == k].mean()) - 1) < 1e-5


def test_normalise_h_mean_one_and_exact_ones_for_rkl():
    h = divergences.get("js").h(torch.rand(64, generator=torch.Generator().manual_seed(1)) * 10 + 0.1)
    assert abs(float(normalise_h(h).mean()) - 1) < 1e-6
    ones = normalise_h(divergences.get("rkl").h(torch.rand(37) + 0.5))
    assert torch.equal(ones, torch.ones(37))


def test_pseudo_target_gradient_is_g_over_numel():
    g0 = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 3, 3, generator=g0, requires_grad=True)
    dt, df = torch.randn(4, 1, 3, 3, generator=g0), torch.randn(4, 1, 3, 3, generator=g0)
    h = torch.tensor([0.5, 1.0, 1.5, 1.0])
    g = dmd_gradient(x, dt, df, h)
    (grad,) = torch.autograd.grad(pseudo_target_loss(x, g), x)
    torch.testing.assert_close(grad, g / x.numel())
    # g is DMD2's normalised score difference, times h
    scale = (x.detach() - dt).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(g, h.reshape(-1, 1, 1, 1) * (df - dt) / scale)
