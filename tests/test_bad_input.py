"""Bad-input matrix, command line: every subcommand refuses bad arguments and hostile files with one line
that names the argument or file, exit code 2 (argparse's code for usage errors), and never a traceback.

Each case is ``(argv, what the message must name)``; ``{name}`` placeholders are files from
``tests/_bad_input_files.py``. After every case the pickle marker must not exist (no payload ran).
Runs in-process (``fastgen.cli.main``) so the whole matrix takes seconds.
"""

from __future__ import annotations

import pytest

from fastgen.cli import main
from tests._bad_input_files import make_files

TRAIN = "fastgen/configs/train/digits-edm.yaml"
DISTILL = "fastgen/configs/distill/digits-js.yaml"
FID = ["--features", "digits", "--no-progress"]

CASES: list[tuple[str, list[str], str]] = [
    # ---- sample
    ("sample-device-cuda", ["sample", "--device", "cuda", "--num", "2"], "--device"),
    ("sample-device-foo", ["sample", "--device", "foo", "--num", "2"], "--device"),
    ("sample-device-cuda7", ["sample", "--device", "cuda:7", "--num", "2"], "--device"),
    ("sample-num-float", ["sample", "--num", "1e9"], "--num"),
    ("sample-num-zero", ["sample", "--num", "0", "--out", "{root}/o.npz"], "--num"),
    ("sample-num-negative", ["sample", "--num", "-5", "--out", "{root}/o.npz"], "--num"),
    ("sample-num-huge", ["sample", "--num", "1000000000000", "--out", "{root}/o.npz"], "--num"),
    ("sample-batch-zero", ["sample", "--num", "2", "--batch-size", "0", "--out", "{root}/o.npz"], "--batch-size"),
    ("sample-steps-zero", ["sample", "--num", "2", "--steps", "0", "--out", "{root}/o.npz"], "--steps"),
    ("sample-class-abc", ["sample", "--num", "2", "--class-label", "abc", "--out", "{root}/o.npz"], "class label"),
    ("sample-class-99", ["sample", "--num", "2", "--class-label", "99", "--out", "{root}/o.npz"], "class label"),
    ("sample-guidance-neg", ["sample", "--num", "2", "--guidance", "-1", "--out", "{root}/o.npz"], "--guidance"),
    ("sample-guidance-shortcut", ["sample", "--model", "digits-shortcut", "--num", "2", "--steps", "4",
                                  "--guidance", "2", "--out", "{root}/o.npz"], "--guidance"),
    ("sample-guidance-student", ["sample", "--model", "digits-fdistill-js", "--num", "2", "--guidance", "2",
                                 "--out", "{root}/o.npz"], "--guidance"),
    ("sample-interval-no-guidance", ["sample", "--num", "2", "--guidance-interval", "0.1", "2",
                                     "--out", "{root}/o.npz"], "--guidance-interval"),
    ("sample-interval-reversed", ["sample", "--num", "2", "--guidance", "2", "--guidance-interval", "2", "0.1",
                                  "--out", "{root}/o.npz"], "--guidance-interval"),
    ("sample-interval-one-value", ["sample", "--num", "2", "--guidance", "2", "--guidance-interval", "2"],
     "--guidance-interval"),
    ("sample-student-heun", ["sample", "--model", "digits-fdistill-js", "--sampler", "heun", "--num", "2",
                             "--out", "{root}/o.npz"], "--sampler"),
    ("sample-sampler-bogus", ["sample", "--sampler", "bogus"], "--sampler"),
    ("sample-seed-abc", ["sample", "--seed", "abc"], "--seed"),
    ("sample-model-unknown", ["sample", "--model", "no-such-model-xyz", "--num", "2"], "no-such-model-xyz"),
    ("sample-model-pickle-bin", ["sample", "--model", "{pickle_bin}", "--num", "2"], "weights.bin"),
    ("sample-model-pickle-pt", ["sample", "--model", "{pickle_pt}", "--num", "2"], "ckpt.pt"),
    ("sample-model-pickle-st", ["sample", "--model", "{pickle_safetensors}", "--num", "2"], "fake.safetensors"),
    ("sample-model-header-bomb", ["sample", "--model", "{header_bomb}", "--num", "2"], "bomb.safetensors"),
    ("sample-model-symlink-loop", ["sample", "--model", "{symlink_loop}", "--num", "2"], "loop"),
    ("sample-model-pipe-pickle", ["sample", "--model", "{pipe_pickle}", "--num", "2"], "pipe_pickle"),
    ("sample-model-pipe-trunc", ["sample", "--model", "{pipe_trunc}", "--num", "2"], "pipe_trunc"),
    ("sample-model-run-pickle", ["sample", "--model", "{run_pickle}", "--num", "2", "--out", "{root}/o.npz"],
     "tensors.safetensors"),
    ("sample-model-student-binary-json", ["sample", "--model", "{student_bin}", "--num", "2"], "stu.safetensors"),
    ("sample-model-dotdot", ["sample", "--model", "{dotdot}", "--num", "2"], "no_such_dir_xyz"),
    ("sample-out-under-file", ["sample", "--num", "2", "--out", "{under_file}"], "--out"),
    ("sample-out-is-file", ["sample", "--num", "2", "--out", "{a_file}"], "--out"),
    ("sample-out-loop", ["sample", "--num", "2", "--out", "{symlink_loop}/x.npz"], "--out"),
    ("sample-schedule-binary", ["sample", "--num", "2", "--schedule", "{binary}", "--out", "{root}/o.npz"],
     "binary.json"),
    ("sample-schedule-pickle", ["sample", "--num", "2", "--schedule", "{pickle_json}", "--out", "{root}/o.npz"],
     "schedule.json"),
    ("sample-schedule-list", ["sample", "--num", "2", "--schedule", "{list_json}", "--out", "{root}/o.npz"],
     "list.json"),
    ("sample-schedule-bad", ["sample", "--num", "2", "--schedule", "{bad_json}", "--out", "{root}/o.npz"],
     "bad.json"),
    ("sample-schedule-empty", ["sample", "--num", "2", "--schedule", "{empty_json}", "--out", "{root}/o.npz"],
     "empty.json"),
    ("sample-schedule-missing", ["sample", "--num", "2", "--schedule", "{root}/nope.json"], "nope.json"),
    ("sample-schedule-loop", ["sample", "--num", "2", "--schedule", "{symlink_loop}"], "loop"),
    # ---- demo
    ("demo-device-cuda", ["demo", "--quick", "--device", "cuda", "--out", "{root}/demo"], "--device"),
    ("demo-device-foo", ["demo", "--quick", "--device", "foo", "--out", "{root}/demo"], "--device"),
    ("demo-num-zero", ["demo", "--quick", "--num", "0", "--out", "{root}/demo"], "--num"),
    ("demo-num-abc", ["demo", "--num", "abc"], "--num"),
    ("demo-out-under-file", ["demo", "--quick", "--num", "4", "--out", "{under_file}"], "--out"),
    # ---- schedule
    ("schedule-dp-heun-nfe2", ["schedule", "dp", "--model", "ring-mixture", "--solver", "heun", "--nfe", "2",
                               "--out", "{root}/dp.json", "--no-progress"], "--nfe"),
    ("schedule-auto-learned-iterations0", ["schedule", "auto", "--model", "ring-mixture", "--nfe", "4",
                                           "--learned-iterations", "0", "--out", "{root}/a.json"],
     "--learned-iterations must be >= 1"),
    ("schedule-dp-interval-no-guidance", ["schedule", "dp", "--model", "digits-edm", "--nfe", "4",
                                          "--guidance-interval", "0.1", "2", "--out", "{root}/dp.json"],
     "--guidance-interval"),
    ("schedule-dp-interval-negative", ["schedule", "dp", "--model", "digits-edm", "--nfe", "4", "--guidance", "2",
                                       "--guidance-interval", "-1", "2", "--out", "{root}/dp.json"],
     "--guidance-interval"),
    ("schedule-dp-nfe0", ["schedule", "dp", "--model", "ring-mixture", "--nfe", "0", "--out", "{root}/dp.json"],
     "nfe"),
    ("schedule-dp-solver", ["schedule", "dp", "--model", "ring-mixture", "--solver", "bogus", "--nfe", "4",
                            "--out", "{root}/dp.json"], "solver"),
    ("schedule-dp-model", ["schedule", "dp", "--model", "bogus", "--nfe", "4", "--out", "{root}/dp.json"],
     "bogus"),
    ("schedule-dp-metric", ["schedule", "dp", "--model", "ring-mixture", "--metric", "bogus", "--nfe", "4",
                            "--out", "{root}/dp.json"], "metric"),
    ("schedule-dp-out-under-file", ["schedule", "dp", "--model", "ring-mixture", "--nfe", "4", "--num-noise", "8",
                                    "--out", "{a_file}/dp.json", "--no-progress"], "--out"),
    ("schedule-ld3-model", ["schedule", "ld3", "--model", "bogus", "--nfe", "4", "--out", "{root}/l.json"],
     "bogus"),
    ("schedule-ays-published", ["schedule", "ays", "--published", "nope", "--steps", "10",
                                "--out", "{root}/a.json"], "--published"),
    ("schedule-ays-out-under-file", ["schedule", "ays", "--published", "sd15", "--steps", "10",
                                     "--out", "{a_file}/a.json"], "--out"),
    ("schedule-show-binary", ["schedule", "show", "{binary}"], "binary.json"),
    ("schedule-show-pickle", ["schedule", "show", "{pickle_json}"], "schedule.json"),
    ("schedule-show-list", ["schedule", "show", "{list_json}"], "list.json"),
    ("schedule-show-bad", ["schedule", "show", "{bad_json}"], "bad.json"),
    ("schedule-show-missing", ["schedule", "show", "{root}/nope.json"], "nope.json"),
    ("schedule-show-loop", ["schedule", "show", "{symlink_loop}"], "loop"),
    # ---- train
    ("train-empty-yaml", ["train", "{empty_yaml}"], "empty.yaml"),
    ("train-list-yaml-set", ["train", "{list_yaml}", "--set", "steps=1"], "list.yaml"),
    ("train-binary-yaml", ["train", "{binary_yaml}"], "binary.yaml"),
    ("train-bad-yaml", ["train", "{bad_yaml}"], "bad.yaml"),
    ("train-python-tag", ["train", "{python_tag_yaml}"], "tag.yaml"),
    ("train-pickle-yaml", ["train", "{pickle_yaml}"], "config.yaml"),
    ("train-missing", ["train", "{root}/nope.yaml"], "nope.yaml"),
    ("train-loop", ["train", "{symlink_loop}"], "loop"),
    ("train-set-no-equals", ["train", TRAIN, "--set", "steps"], "--set"),
    ("train-output-under-file", ["train", TRAIN, "--set", "output_dir={a_file}/run", "--set", "steps=1",
                                 "--no-progress"], "a_file.txt"),
    ("train-resume-pickle", ["train", "mixture-edm", "--set", "output_dir={run_pickle}", "--set", "steps=2",
                             "--no-progress"], "tensors.safetensors"),
    # ---- distill
    ("distill-empty-yaml", ["distill", "{empty_yaml}"], "empty.yaml"),
    ("distill-list-yaml-set", ["distill", "{list_yaml}", "--set", "steps=1"], "list.yaml"),
    ("distill-binary-yaml", ["distill", "{binary_yaml}"], "binary.yaml"),
    ("distill-pickle-yaml", ["distill", "{pickle_yaml}"], "config.yaml"),
    ("distill-export-dotdot", ["distill", DISTILL, "--export", "../../..", "--set", "steps=1"], "--export"),
    ("distill-export-abs", ["distill", DISTILL, "--export", "{root}/stolen", "--set", "steps=1"], "--export"),
    ("distill-eval-negative", ["distill", DISTILL, "--eval", "-3", "--set", "steps=1"], "--eval"),
    ("distill-train-config", ["distill", TRAIN, "--set", "steps=1"], "method.name"),
    # ---- fid / fid-stats / is: images
    ("fid-unit-float", ["fid", "{unit_float_npz}", "digits:test", *FID], "--value-range"),
    ("fid-float255", ["fid", "{float255_npz}", "digits:test", *FID], "--value-range"),
    ("fid-value-range-bogus", ["fid", "digits:test", "digits:train", "--value-range", "bogus"], "--value-range"),
    ("fid-value-range-wrong", ["fid", "{two_npz}", "digits:train", "--value-range", "0,1", *FID], "0,1"),
    ("fid-rgba", ["fid", "{rgba_npz}", "digits:test", *FID], "rgba.npz"),
    ("fid-negative-int", ["fid", "{int_npz}", "digits:test", *FID], "negint.npz"),
    ("fid-nan", ["fid", "{nan_npz}", "digits:test", *FID], "nan.npz"),
    ("fid-rank2", ["fid", "{rank2_npz}", "digits:test", *FID], "rank2.npz"),
    ("fid-two-keys", ["fid", "{two_keys_npz}", "digits:test", *FID], "two_keys.npz"),
    ("fid-pickle-images", ["fid", "{pickle_images_npz}", "digits:test", *FID], "pickled_images.npz"),
    ("fid-not-npz", ["fid", "{not_npz}", "digits:test", *FID], "not.npz"),
    ("fid-truncated-npz", ["fid", "{truncated_npz}", "digits:test", *FID], "truncated.npz"),
    ("fid-short-npz", ["fid", "{short_npz}", "digits:test", *FID], "short.npz"),
    ("fid-pickle-png", ["fid", "{root}/pickle_png", "digits:test", *FID], "000000.png"),
    ("fid-mixed-png", ["fid", "{mixed_png}", "digits:test", *FID], "mixed_png"),
    ("fid-empty-dir", ["fid", "{empty_dir}", "digits:test", *FID], "empty_dir"),
    ("fid-loop", ["fid", "{symlink_loop}", "digits:test", *FID], "loop"),
    ("fid-dotdot", ["fid", "{dotdot}", "digits:test", *FID], "no_such_dir_xyz"),
    ("fid-digits-split", ["fid", "digits:nope", "digits:test", *FID], "nope"),
    # ---- fid: statistics and options
    ("fid-pickle-stats", ["fid", "digits:test", "{pickle_stats_npz}", *FID], "pickled_stats.npz"),
    ("fid-nonpsd-stats", ["fid", "digits:test", "{nonpsd_stats}", *FID], "positive semi-definite"),
    ("fid-asym-stats", ["fid", "digits:test", "{asym_stats}", *FID], "symmetric"),
    ("fid-nan-stats", ["fid", "digits:test", "{nan_stats}", *FID], "nan_stats.npz"),
    ("fid-shape-stats", ["fid", "digits:test", "{shape_stats}", *FID], "shape_stats.npz"),
    ("fid-device-cuda", ["fid", "digits:test", "digits:train", "--device", "cuda", *FID], "--device"),
    ("fid-device-foo", ["fid", "digits:test", "digits:train", "--device", "foo", *FID], "--device"),
    ("fid-batch-zero", ["fid", "digits:test", "digits:train", "--batch-size", "0", *FID], "--batch-size"),
    ("fid-max-samples-1", ["fid", "digits:test", "digits:train", "--max-samples", "1", *FID], "--max-samples"),
    ("fid-kid-subset-big", ["fid", "digits:test", "digits:train", "--kid", "--kid-subset-size", "5000", *FID],
     "--kid-subset-size"),
    ("fid-kid-subset-1", ["fid", "digits:test", "digits:train", "--kid", "--kid-subset-size", "1", *FID],
     "--kid-subset-size"),
    ("fid-save-stats-under-file", ["fid", "digits:test", "digits:train", "--save-stats", "{under_file}", *FID],
     "--save-stats"),
    ("fid-inception-pickle", ["fid", "digits:test", "digits:train", "--inception-weights", "{pickle_pt}",
                              "--no-progress"], "ckpt.pt"),
    ("fid-inception-bomb", ["fid", "digits:test", "digits:train", "--inception-weights", "{header_bomb}",
                            "--no-progress"], "bomb.safetensors"),
    ("fid-inception-missing", ["fid", "digits:test", "digits:train", "--inception-weights", "{root}/none.pth",
                               "--no-progress"], "none.pth"),
    ("fid-stats-out-under-file", ["fid-stats", "digits:test", "-o", "{under_file}", *FID], "--output"),
    ("fid-stats-pickle-images", ["fid-stats", "{pickle_images_npz}", "-o", "{root}/s.npz", *FID],
     "pickled_images.npz"),
    ("fid-stats-loop", ["fid-stats", "{symlink_loop}", "-o", "{root}/s.npz", *FID], "loop"),
    ("is-splits-zero", ["is", "digits:test", "--splits", "0", *FID], "--splits"),
    ("is-pickle-images", ["is", "{pickle_images_npz}", *FID], "pickled_images.npz"),
    ("is-unit-float", ["is", "{unit_float_npz}", *FID], "--value-range"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("hostile"))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``fastgen ARGV`` in-process (argparse's SystemExit included)."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input(argv, names, files, capsys):
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    rc, err = run_cli(args, capsys)  # an exception escaping main() fails the test: a raw traceback
    assert "Traceback" not in err
    assert rc == 2, f"exit {rc}, stderr: {err[-600:]}"
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert lines, err
    assert names.lower() in lines[-1].lower(), lines[-1]
    assert not files["marker"].exists(), "a pickle payload ran"
