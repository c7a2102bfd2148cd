"""The FID InceptionV3 path end to end with a seeded random network in a temporary weights file."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastgen.metrics import (
    InceptionExtractor,
    evaluate,
    extract_features,
    frechet_distance,
    images_to_uint8,
    load_stats,
)
from fastgen.metrics import inception as inc


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(inc.random_inception_state_dict(seed=0), path)
    return path, inc.file_sha256(path)


def _reference_tf_resize(x, oh, ow):
    """Per-pixel TF1 bilinear (align_corners=False): source = dst * in / out, border clamped."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, oh, ow, dtype=x.dtype)
    for i in range(oh):
        sy = i * (h / oh)
        y0 = math.floor(sy)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(ow):
            sx = j * (w / ow)
            x0 = math.floor(sx)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = x[:, :, y0, x0] * (1 - fx) + x[:, :, y0, x1] * fx
            bot = x[:, :, y1, x0] * (1 - fx) + x[:, :, y1, x1] * fx
            out[:, :, i, j] = top * (1 - fy) + bot * fy
    return out


def test_tf_resize_matches_reference_and_differs_from_antialias():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 7, generator=gen, dtype=torch.float64) * 255
    got = inc.tf_bilinear_resize(x, (13, 11))
    torch.testing.assert_close(got, _reference_tf_resize(x, 13, 11), rtol=1e-6, atol=1e-4)
    # upsampling by 2 reproduces the input on even pixels (no half-pixel offset)
    torch.testing.assert_close(inc.tf_bilinear_resize(x, (10, 14))[:, :, ::2, ::2], x)
    img = torch.rand(1, 3, 32, 32, generator=gen) * 255
    diff = (inc.resize_to_inception(img, "tf") - inc.resize_to_inception(img, "antialias")).abs().mean()
    assert diff > 5.0  # the ~0.45-pixel shift of torchmetrics' antialias default is visible
    with pytest.raises(ValueError, match="resize must be one of"):
        inc.resize_to_inception(img, "bicubic")


def test_uint8_quantisation_rounds_half_up():
    k = torch.arange(256, dtype=torch.float64)
    x = ((k - 127.5) / 127.5).float().view(1, 1, 16, 16)
    assert torch.equal(images_to_uint8(x)[0, 0].flatten().long(), k.long())  # exact levels are kept
    # 0.6 of a level above k rounds to k+1 (truncation, as torchmetrics' normalize=True does, gives k)
    y = ((torch.tensor([10.6, 10.4, 200.5]) - 127.5) / 127.5).view(1, 1, 1, 3)
    assert images_to_uint8(y)[0, 0, 0].tolist() == [11, 10, 201]
    assert images_to_uint8(torch.full((1, 1, 2, 2), 1.2)).max() == 255  # clipped
    assert images_to_uint8(torch.zeros(2, 1, 4, 4)).shape == (2, 3, 4, 4)  # gray -> RGB
    with pytest.raises(ValueError, match="1 or 3 channels"):
        images_to_uint8(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        images_to_uint8(torch.full((1, 3, 4, 4), 255.0))


def test_missing_weights_error_and_resolution_order(tmp_path, monkeypatch, weights):
    path, _ = weights
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as err:
        inc.resolve_inception_weights()
    msg = str(err.value)
    for needle in (
        inc.INCEPTION_FILENAMES[0],
        "95,628,359",
        inc.INCEPTION_SHA256,
        inc.ENV_VAR,
        str(tmp_path / "torch" / "hub" / "checkpoints"),
        inc.INCEPTION_URLS[1],
    ):
        assert needle in msg
    with pytest.raises(FileNotFoundError, match="no such file"):
        inc.resolve_inception_weights(tmp_path / "nope.pth")
    # 3. torch-hub cache under the pytorch-fid name
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    cached = hub / inc.INCEPTION_FILENAMES[1]
    cached.write_bytes(b"x")
    assert inc.resolve_inception_weights() == cached
    # 2. the environment variable wins over the cache
    monkeypatch.setenv(inc.ENV_VAR, str(path))
    assert inc.resolve_inception_weights() == path
    # 1. an explicit path wins over both
    assert inc.resolve_inception_weights(cached) == cached


def test_hash_check_and_key_check(tmp_path, weights):
    path, digest = weights
    with pytest.raises(ValueError, match=f"does not match the expected {inc.INCEPTION_SHA256}"):
        inc.load_inception(path)  # default: the standard FID weights' sha256
    net64 = inc.load_inception(path, sha256=digest, dtype=torch.float64)  # the float64 extractor option
    assert net64.fc.weight.dtype == torch.float64 and not net64.training
    assert all(not p.requires_grad for p in net64.parameters())
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="keys do not match"):
        inc.load_inception(bad, sha256=None)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a loadable state dict"):
        inc.load_inception(corrupt, sha256=None)


def test_end_to_end_and_torchmetrics_parity(weights, tmp_path):
    """The expensive test: 4 forward passes of one 299x299 image through the 24M-parameter network."""
    from safetensors.torch import save_file
    from torchmetrics.image.fid import FrechetInceptionDistance

    path, digest = weights
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    fake = (torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    ex = InceptionExtractor(path, sha256=digest)
    assert ex.metadata()["weights_sha256"] == digest and ex.metadata()["resize"] == "tf"
    real_net, calls = ex.net, []

    class PerImageCache(nn.Module):
        """The loaded network, run once per distinct image (both libraries see the same outputs)."""

        def __init__(self):
            super().__init__()
            self.cache = {}

        def forward(self, x):
            outs = []
            for img in x:
                key = img.numpy().tobytes()
                if key not in self.cache:
                    calls.append(1)
                    self.cache[key] = real_net(img[None])
                outs.append(self.cache[key])
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    ex._net = PerImageCache()  # 4 distinct images: 4 forward passes instead of 9

    class Pool(nn.Module):  # the same network as a torchmetrics custom feature module
        num_features = 2048

        def forward(self, x):
            return ex.net(x)[0]

    tm = FrechetInceptionDistance(feature=Pool())
    tm.update(images_to_uint8(real), real=True)
    tm.update(images_to_uint8(fake), real=False)
    # fastgen: float images in [-1, 1] (1-channel fake repeated to RGB inside), batches of 1
    out = tmp_path / "fake.npz"
    res = evaluate(fake[:, :1], real, ex, ("fid", "is"), is_splits=1, batch_size=1, progress=False, save_stats_to=out)
    assert res["n_samples"] == 2 and res["fid"] > 0
    assert 1.0 <= res["is_mean"] <= 2.0 + 1e-9  # 2 images: IS <= 2
    # the statistics equal torchmetrics' float64 states (same network, same uint8 images)
    mine = load_stats(out)
    n = int(tm.fake_features_num_samples)
    mu_tm = (tm.fake_features_sum / n).numpy()
    cov_tm = (
        (tm.fake_features_cov_sum - n * torch.outer(tm.fake_features_sum / n, tm.fake_features_sum / n)) / (n - 1)
    ).numpy()
    np.testing.assert_allclose(mine.mu, mu_tm, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mine.sigma, cov_tm, rtol=1e-6, atol=1e-9)
    assert mine.meta["extractor"].startswith("inception") and mine.meta["weights_sha256"] == digest
    # and so does the distance (on a 64-d block: torchmetrics' 2048-d eigvals costs seconds on a CPU)
    real_st = extract_features(real, ex, progress=False).stats
    blk = slice(0, 64)
    from torchmetrics.image.fid import _compute_fid

    expected = float(
        _compute_fid(
            torch.from_numpy(mine.mu[blk]),
            torch.from_numpy(mine.sigma[blk, blk]),
            real_st.mu[blk],
            real_st.sigma[blk, blk],
        )
    )
    got = frechet_distance(mine.mu[blk], mine.sigma[blk, blk], real_st.mu[blk], real_st.sigma[blk, blk])
    assert got == pytest.approx(expected, rel=1e-6)
    feats, logits = ex(real[:1])
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(feats).all() and feats.std() > 1e-3
    # the same weights as .safetensors load to the same network
    st_path = tmp_path / "w.safetensors"
    save_file(inc.random_inception_state_dict(seed=0), str(st_path))
    net2 = inc.load_inception(st_path, sha256=inc.file_sha256(st_path))
    for (k, v), (k2, v2) in zip(ex.net.state_dict().items(), net2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert len(calls) == 4
