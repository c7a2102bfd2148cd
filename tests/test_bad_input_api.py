"""Bad-input matrix, Python API: the helpers behind every command (device resolver, output-path check,
JSON/YAML reader, image reader, metrics) raise ``ValueError``/``FileNotFoundError`` naming the argument or
file; hostile files never run their pickle payload; and the formerly *silently wrong* cases now give the
right number (16-bit PNGs, [0, 1] floats, a stats file's extractor) or refuse (non-PSD covariance, NaN
student) -- each asserted against an independent computation.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastgen.cli import main
from fastgen.data.images import normalize_images, read_image_file
from fastgen.io.devices import resolve_device
from fastgen.io.files import read_json, read_text, read_yaml
from fastgen.io.paths import atomic_write, check_inside, check_output_path
from fastgen.metrics import evaluate, fid, frechet_distance, kid, load_stats
from fastgen.metrics.compute import SmallSampleWarning, extract_features
from fastgen.metrics.io import iter_npz_batches, load_npz_images, save_stats
from tests._bad_input_files import make_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("hostile_api"))


def _digits(n: int = 64, seed: int = 0) -> torch.Tensor:
    from fastgen.data import load_digits_split

    return load_digits_split("train").images[seed : seed + n]


def _load_student(path):
    from fastgen.distill.student import load_student

    return load_student(path)


# (callable taking the files dict, expected exception, text the message must contain)
API_CASES = [
    ("device-cuda", lambda f: resolve_device("cuda") if not torch.cuda.is_available() else resolve_device("foo"),
     ValueError, "--device"),
    ("device-foo", lambda f: resolve_device("foo"), ValueError, "'foo'"),
    ("device-index", lambda f: resolve_device("cuda:99"), ValueError, "cuda:99"),
    ("device-tpu", lambda f: resolve_device("xla"), ValueError, "accepted"),
    ("device-mps", lambda f: resolve_device("mps", name="device") if not torch.backends.mps.is_available()
     else resolve_device("bogus", name="device"), ValueError, "device"),
    ("json-binary", lambda f: read_json(f["binary"], "--schedule"), ValueError, "binary.json"),
    ("json-pickle", lambda f: read_json(f["pickle_json"]), ValueError, "schedule.json"),
    ("json-list", lambda f: read_json(f["list_json"]), ValueError, "list.json"),
    ("json-bad", lambda f: read_json(f["bad_json"]), ValueError, "line 1"),
    ("json-empty", lambda f: read_json(f["empty_json"]), ValueError, "empty.json"),
    ("json-missing", lambda f: read_json(f["root"] / "nope.json"), FileNotFoundError, "nope.json"),
    ("json-folder", lambda f: read_json(f["empty_dir"]), ValueError, "empty_dir"),
    ("json-loop", lambda f: read_json(f["symlink_loop"]), ValueError, "loop"),
    ("yaml-empty", lambda f: read_yaml(f["empty_yaml"]), ValueError, "empty.yaml"),
    ("yaml-list", lambda f: read_yaml(f["list_yaml"]), ValueError, "list.yaml"),
    ("yaml-bad", lambda f: read_yaml(f["bad_yaml"]), ValueError, "bad.yaml"),
    ("yaml-binary", lambda f: read_yaml(f["binary_yaml"]), ValueError, "binary.yaml"),
    ("yaml-python-tag", lambda f: read_yaml(f["python_tag_yaml"]), ValueError, "tag.yaml"),
    ("text-loop", lambda f: read_text(f["symlink_loop"], "--config"), ValueError, "--config"),
    ("out-under-file", lambda f: check_output_path(f["under_file"]), ValueError, "a_file.txt"),
    ("out-file-as-folder", lambda f: check_output_path(f["a_file"], kind="folder"), ValueError, "a_file.txt"),
    ("out-folder-as-file", lambda f: check_output_path(f["empty_dir"], "--output"), ValueError, "--output"),
    ("out-loop", lambda f: check_output_path(f["symlink_loop"] / "x"), ValueError, "loop"),
    ("inside-dotdot", lambda f: check_inside("../../..", f["empty_dir"]), ValueError, "--export"),
    ("inside-abs", lambda f: check_inside("/etc", f["empty_dir"]), ValueError, "outside"),
    ("inside-loop", lambda f: check_inside("loop", f["root"]), ValueError, "loop"),
    ("range-ambiguous", lambda f: normalize_images(torch.rand(4, 1, 8, 8)), ValueError, "value_range"),
    ("range-bogus", lambda f: normalize_images(torch.rand(4, 1, 8, 8), "0-1"), ValueError, "value_range"),
    ("range-wrong", lambda f: normalize_images(torch.rand(4, 1, 8, 8) * 2 - 1, "0,1"), ValueError, "0,1"),
    ("range-255", lambda f: normalize_images(torch.rand(4, 1, 8, 8) * 255), ValueError, "0,255"),
    ("range-int-dtype", lambda f: normalize_images(torch.full((2, 1, 8, 8), 70000)), ValueError, "70000"),
    ("range-nan", lambda f: normalize_images(torch.full((2, 1, 8, 8), float("nan"))), ValueError, "NaN"),
    ("image-pickle", lambda f: read_image_file(f["pickle_png"]), ValueError, "000000.png"),
    ("image-missing", lambda f: read_image_file(f["root"] / "none.png"), FileNotFoundError, "none.png"),
    ("image-channels", lambda f: read_image_file(f["pickle_png"], channels=2), ValueError, "channels"),
    ("npz-pickle", lambda f: load_npz_images(f["pickle_images_npz"]), ValueError, "pickled_images.npz"),
    ("npz-short", lambda f: list(iter_npz_batches(f["short_npz"], 4)), ValueError, "truncated"),
    ("npz-not-zip", lambda f: load_npz_images(f["not_npz"]), ValueError, "not.npz"),
    ("stats-pickle", lambda f: load_stats(f["pickle_stats_npz"]), ValueError, "pickled_stats.npz"),
    ("stats-nan", lambda f: load_stats(f["nan_stats"]), ValueError, "nan_stats.npz"),
    ("stats-shape", lambda f: load_stats(f["shape_stats"]), ValueError, "shape_stats.npz"),
    ("fd-nonpsd", lambda f: frechet_distance(np.zeros(3), np.diag([1.0, -2.0, 1.0]), np.zeros(3), np.eye(3)),
     ValueError, "sigma1"),
    ("fd-asym", lambda f: frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 2], [0, 1]])),
     ValueError, "sigma2"),
    ("fid-nonpsd-file", lambda f: fid(_digits(), f["nonpsd_stats"], progress=False), ValueError, "sigma"),
    ("fid-extractor-mismatch", lambda f: fid(_digits(), f["nonpsd_stats"], "inception", progress=False),
     (ValueError, FileNotFoundError), "inception"),
    ("kid-subset", lambda f: kid(torch.randn(5, 3), torch.randn(5, 3), subset_size=10), ValueError,
     "subset_size"),
    ("evaluate-kid-subset", lambda f: evaluate(_digits(20), _digits(20, 100), "digits", ("fid", "kid"),
                                              kid_subset_size=50, progress=False), ValueError, "kid_subset_size"),
    ("evaluate-value-range", lambda f: evaluate(torch.rand(8, 1, 8, 8), _digits(), "digits", progress=False),
     ValueError, "value_range"),
    ("evaluate-metric", lambda f: evaluate(_digits(), _digits(), "digits", ("fdd",)), ValueError, "fdd"),
    ("extract-max-samples", lambda f: extract_features(_digits(), "digits", max_samples=1), ValueError,
     "max_samples"),
    ("student-binary-json", lambda f: _load_student(f["student_bin"]), ValueError, "stu.json"),
    ("atomic-mode", lambda f: atomic_write(f["root"] / "x", "a").__enter__(), ValueError, "mode"),
]


@pytest.mark.parametrize("call,exc,names", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(call, exc, names, files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        with pytest.raises(exc) as info:
            call(files)
    assert names.lower() in str(info.value).lower(), str(info.value)
    assert not files["marker"].exists(), "a pickle payload ran"


# ------------------------------------------------------------------ formerly silently wrong, now right
def test_16bit_png_reads_like_its_8bit_twin(files):
    """16-bit PNGs were clipped to black and white; now v/257 rounding gives the 8-bit twin exactly."""
    arr16, info = read_image_file(files["png16"] / "000.png")
    arr8, _ = read_image_file(files["png8"] / "000.png")
    assert info.bit_depth == 16 and "16-bit" in info.note
    np.testing.assert_array_equal(arr16, arr8)
    assert len(np.unique(arr16)) > 10  # not black and white


def test_unit_float_images_with_value_range_match_minus_one_one():
    """Diffusers' [0, 1] floats, declared as such, give the FD of the same images in [-1, 1]."""
    x = (_digits(300) + 1) / 2
    ref = _digits(300, 400)  # value_range="0,1" applies to both sides: the reference goes to [0, 1] too
    ref01 = (ref + 1) / 2
    fd01 = fid(x, ref01, "digits", value_range="0,1", progress=False)
    fd11 = fid(x * 2 - 1, ref01 * 2 - 1, "digits", progress=False)
    # The two sides map [0, 1] to [-1, 1] by different float32 expressions (last-bit differences), then pass
    # the float32 classifier: the FDs agree to ~1e-6 relative, while a misread range moves FD by orders of magnitude.
    assert fd01 == pytest.approx(fd11, rel=1e-6)
    with pytest.raises(ValueError, match="value_range"):
        fid(x, ref, "digits", progress=False)  # never guessed


def test_fid_uses_the_stats_files_extractor(tmp_path):
    """fid(x, digits-stats.npz) with no features uses the digits classifier recorded in the file."""
    ref = _digits(400, 400)
    st = extract_features(ref, "digits", progress=False).reference()
    path = save_stats(tmp_path / "digits-test.npz", st.mu, st.sigma, **st.meta)
    x = _digits(300)
    # Both sides pass x through the float32 classifier; nothing promises the same batching on both paths, so the
    # float32 bound (~1e-6 relative) applies. The Inception path would give an FD of another scale entirely.
    assert fid(x, path, progress=False) == pytest.approx(
        frechet_distance(*_musig(x), st.mu, st.sigma), rel=1e-6)


def _musig(x):
    s = extract_features(x, "digits", progress=False).stats
    return s.mu, s.sigma


def test_two_image_fid_warns():
    with pytest.warns(SmallSampleWarning, match="only 2 images"):
        fid(_digits(2), _digits(300, 300), "digits", progress=False)


def test_nonpsd_refused_by_api_and_cli_alike(files, capsys):
    with pytest.raises(ValueError, match="positive semi-definite"):
        fid(_digits(), files["nonpsd_stats"], progress=False)
    assert main(["fid", "digits:test", str(files["nonpsd_stats"]), "--no-progress"]) == 2
    assert "positive semi-definite" in capsys.readouterr().err


def test_nan_student_fails_naming_the_batch(tmp_path, capsys):
    """A one-step student with NaN weights exits 1 naming the model and the batch, and writes nothing."""
    from fastgen.models.zoo import WEIGHTS_DIR

    shutil.copy(WEIGHTS_DIR / "digits-fdistill-js.json", tmp_path / "nan-student.json")
    sd = load_file(str(WEIGHTS_DIR / "digits-fdistill-js.safetensors"))
    sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "nan-student.safetensors"))
    out = tmp_path / "o.npz"
    rc = main(["sample", "--model", str(tmp_path / "nan-student.safetensors"), "--num", "8", "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "NaN" in err and "batch 0" in err and "nan-student" in err, err
    assert not out.exists() and not list(tmp_path.glob(".o.npz*"))


def test_sample_npz_streams_the_same_samples_as_generate(tmp_path):
    """Streaming to disk changes nothing: the .npz holds exactly generate()'s samples."""
    from fastgen.commands._generate import SampleSpec, generate
    from fastgen.models import load_model

    out = tmp_path / "s.npz"
    assert main(["sample", "--num", "40", "--batch-size", "16", "--steps", "3", "--out", str(out),
                 "--no-progress"]) == 0
    x, _ = generate(load_model("digits-edm"), SampleSpec(steps=3), 40, batch_size=16, progress=False)
    with np.load(out) as f:
        np.testing.assert_array_equal(f["samples"], x.clamp(-1, 1).numpy())
        assert json.loads(str(f["identity"]))["name"] == "digits-edm"


def test_cli_two_image_fid_says_so(files, capsys):
    """The CLI prints the small-sample warning as one line (no Python warning source line, no traceback)."""
    assert main(["fid", str(files["two_npz"]), "digits:test", "--features", "digits", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "fastgen fid: warning: samples: only 2 images" in err and "Traceback" not in err
    assert "SmallSampleWarning" not in err


def test_atomic_write_keeps_the_old_file_on_error_and_uses_umask_permissions(tmp_path):
    """A failed write leaves the previous content and no temporary; a finished one has the umask's mode."""
    import os

    p = tmp_path / "s.json"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(p, "w") as f:
        f.write("half")
        raise RuntimeError("boom")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["s.json"]
    with atomic_write(p, "w") as f:
        f.write("new")
    umask = os.umask(0)
    os.umask(umask)
    assert p.read_text() == "new" and (p.stat().st_mode & 0o777) == (0o666 & ~umask)
