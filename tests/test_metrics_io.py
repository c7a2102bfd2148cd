"""Statistics files, image folders/npz, and the `fastgen fid` / `fid-stats` / `is` commands."""

import json

import numpy as np
import pytest
import torch

from fastgen.cli import main
from fastgen.data import load_digits_split
from fastgen.metrics import digits_fd, fid, load_stats, save_stats
from fastgen.metrics.io import iter_folder_batches, load_npz_images, save_image_folder


def test_stats_roundtrip_and_foreign_formats(tmp_path):
    rng = np.random.default_rng(0)
    mu, a = rng.standard_normal(6), rng.standard_normal((6, 6))
    sigma = a @ a.T
    path = save_stats(tmp_path / "ref", mu, sigma, extractor="digits", count=10)
    assert path.suffix == ".npz"
    with np.load(path) as f:  # what pytorch-fid / EDM read: plain arrays, no pickle
        np.testing.assert_array_equal(f["mu"], mu)
        assert f["sigma"].dtype == np.float64
    st = load_stats(path)
    np.testing.assert_array_equal(st.sigma, sigma)
    assert st.meta["extractor"] == "digits" and st.count == 10 and "fastgen_version" in st.meta
    np.savez(tmp_path / "edm.npz", mu=mu.astype(np.float32), sigma=sigma)  # EDM-style: only mu/sigma
    assert load_stats(tmp_path / "edm.npz").count is None
    assert fid(tmp_path / "edm.npz", path) == pytest.approx(0.0, abs=1e-5)


def test_bad_files(tmp_path):
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ValueError, match="corrupt.npz"):
        load_stats(tmp_path / "corrupt.npz")
    np.savez(tmp_path / "noms.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(ValueError, match="no 'mu'/'sigma'"):
        load_stats(tmp_path / "noms.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"sigma \(d, d\)"):
        load_stats(tmp_path / "shape.npz")
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "missing.npz")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="contains no images"):
        fid(tmp_path / "empty", "digits:test", features="digits")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        fid(tmp_path / "absent", "digits:test", features="digits")
    a = save_stats(tmp_path / "a", np.zeros(3), np.eye(3))
    b = save_stats(tmp_path / "b", np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="mismatched feature sizes"):
        fid(a, b)


def test_png_folder_and_npz_images_give_digits_fd(tmp_path):
    test = load_digits_split("test").images
    files = save_image_folder(test, tmp_path / "png")
    assert len(files) == 899
    batches = list(iter_folder_batches(tmp_path / "png", 500))
    assert [b.shape[0] for b in batches] == [500, 399] and batches[0].dtype == torch.uint8
    # PNG round trip quantises 17 digit levels to uint8: FD to the originals stays tiny vs real-vs-real
    fd_png = fid(tmp_path / "png", "digits:test", features="digits", progress=False)
    assert fd_png < 0.05 * digits_fd(load_digits_split("train").images)
    u8 = torch.cat(batches).permute(0, 2, 3, 1).numpy()  # NHWC uint8 like EDM/ADM sample files
    np.savez(tmp_path / "samples.npz", arr_0=u8)
    assert load_npz_images(tmp_path / "samples.npz").shape == (899, 1, 8, 8)
    assert fid(tmp_path / "samples.npz", "digits:test", features="digits", progress=False) == pytest.approx(fd_png)


def test_cli_fid_stats_is_roundtrip(tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    assert main(["fid-stats", "digits:test", "-o", str(ref), "--features", "digits", "--no-progress"]) == 0
    assert load_stats(ref).count == 899
    capsys.readouterr()
    args = ["fid", "digits:train", str(ref), "--features", "digits", "--json", "--no-progress"]
    assert main(args + ["--save-stats", str(tmp_path / "s.npz")]) == 0
    out = json.loads(capsys.readouterr().out)
    # The CLI and digits_fd push float32 features through the classifier in different batch sizes, so the
    # features differ in the last bit (~1e-7 relative); the FD built from them agrees to ~1e-6, not 1e-9.
    assert out["fid"] == pytest.approx(digits_fd(load_digits_split("train").images), rel=1e-6)
    assert out["n_samples"] == 898
    assert main(["fid", str(tmp_path / "s.npz"), str(ref), "--json"]) == 0  # statistics on both sides
    # Same float64 statistics on both paths (saved bit-exactly), so only the float64 FD arithmetic differs:
    # ~d * eps64 * ||sigma|| relative, far below 1e-9.
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(out["fid"], rel=1e-9)
    assert main(["is", "digits:test", "--features", "digits", "--json", "--no-progress"]) == 0
    is_mean = json.loads(capsys.readouterr().out)["is_mean"]
    assert 8.0 < is_mean < 10.0  # ten classes present, classifier ~98% accurate
    assert main(["fid", str(tmp_path / "nope"), str(ref), "--features", "digits"]) == 2
    assert "no such folder" in capsys.readouterr().err
