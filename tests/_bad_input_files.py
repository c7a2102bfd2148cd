"""Hostile and broken files for the bad-input matrix (tests/test_bad_input*.py).

``make_files(root)`` writes them under ``root`` and returns a dict name -> path. The pickle payloads
call ``open(MARKER, "w")`` when unpickled, so a test asserts that the marker file never appears.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np


class Payload:
    """Unpickling this object creates the marker file (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _npz_with_pickle(path: Path, key: str, payload: Payload) -> None:
    """An .npz whose ``key`` member is an object array (a pickle inside the .npy)."""
    arr = np.empty(1, dtype=object)
    arr[0] = payload
    np.savez(path, **{key: arr})


def make_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "PWNED"
    payload = Payload(marker)
    f: dict[str, Path] = {"marker": marker, "root": root}

    f["pickle_bin"] = root / "weights.bin"
    f["pickle_bin"].write_bytes(pickle.dumps(payload))
    f["pickle_pt"] = root / "ckpt.pt"
    f["pickle_pt"].write_bytes(pickle.dumps({"state_dict": payload}))
    f["pickle_safetensors"] = root / "fake.safetensors"
    f["pickle_safetensors"].write_bytes(pickle.dumps(payload))
    f["pickle_images_npz"] = root / "pickled_images.npz"
    _npz_with_pickle(f["pickle_images_npz"], "arr_0", payload)
    f["pickle_stats_npz"] = root / "pickled_stats.npz"
    arr = np.empty(1, dtype=object)
    arr[0] = payload
    np.savez(f["pickle_stats_npz"], mu=arr, sigma=arr)
    f["pickle_png"] = root / "pickle_png" / "000000.png"
    f["pickle_png"].parent.mkdir()
    f["pickle_png"].write_bytes(pickle.dumps(payload))
    f["pickle_json"] = root / "schedule.json"
    f["pickle_json"].write_bytes(pickle.dumps(payload))
    f["pickle_yaml"] = root / "config.yaml"
    f["pickle_yaml"].write_bytes(pickle.dumps(payload))

    f["header_bomb"] = root / "bomb.safetensors"
    f["header_bomb"].write_bytes(struct.pack("<Q", 2**62) + b"{" + b" " * 64)

    loop = root / "loop"
    os.symlink(root / "loop_b", loop)
    os.symlink(loop, root / "loop_b")
    f["symlink_loop"] = loop

    f["binary"] = root / "binary.json"
    f["binary"].write_bytes(bytes(range(256)) * 4)
    f["binary_yaml"] = root / "binary.yaml"
    f["binary_yaml"].write_bytes(b"\xff\xfe\x00\x81" * 64)
    f["empty_yaml"] = root / "empty.yaml"
    f["empty_yaml"].write_text("")
    f["list_yaml"] = root / "list.yaml"
    f["list_yaml"].write_text("- a\n- b\n")
    f["bad_yaml"] = root / "bad.yaml"
    f["bad_yaml"].write_text("a: [1, 2\nb: }\n")
    f["python_tag_yaml"] = root / "tag.yaml"
    f["python_tag_yaml"].write_text(f"a: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    f["list_json"] = root / "list.json"
    f["list_json"].write_text("[1, 2, 3]")
    f["bad_json"] = root / "bad.json"
    f["bad_json"].write_text("{\"a\": 1,,}")
    f["empty_json"] = root / "empty.json"
    f["empty_json"].write_text("")

    f["a_file"] = root / "a_file.txt"
    f["a_file"].write_text("I am a file")
    f["under_file"] = f["a_file"] / "out.npz"

    f["not_npz"] = root / "not.npz"
    f["not_npz"].write_bytes(b"this is not a zip")
    f["truncated_npz"] = root / "truncated.npz"
    np.savez(f["truncated_npz"], arr_0=np.zeros((10, 1, 8, 8), np.float32))
    data = f["truncated_npz"].read_bytes()
    f["truncated_npz"].write_bytes(data[: len(data) // 2])
    f["short_npz"] = root / "short.npz"  # a valid zip whose .npy member is cut: header says 10 rows
    with zipfile.ZipFile(f["short_npz"], "w") as zf:
        with zf.open("arr_0.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10, 1, 8, 8)})
            fh.write(np.zeros((3, 1, 8, 8), np.float32).tobytes())
    f["unit_float_npz"] = root / "unit_float.npz"  # Diffusers np output: [0, 1]
    rng = np.random.default_rng(0)
    np.savez(f["unit_float_npz"], images=rng.random((16, 8, 8, 1), dtype=np.float32))
    f["float255_npz"] = root / "float255.npz"
    np.savez(f["float255_npz"], images=(rng.random((16, 1, 8, 8)) * 255).astype(np.float32))
    f["rgba_npz"] = root / "rgba.npz"
    np.savez(f["rgba_npz"], images=np.zeros((4, 8, 8, 4), np.uint8))
    f["int_npz"] = root / "negint.npz"
    np.savez(f["int_npz"], images=-np.ones((4, 1, 8, 8), np.int32))
    f["nan_npz"] = root / "nan.npz"
    np.savez(f["nan_npz"], images=np.full((4, 1, 8, 8), np.nan, np.float32))
    f["two_keys_npz"] = root / "two_keys.npz"
    np.savez(f["two_keys_npz"], a=np.zeros((4, 1, 8, 8)), b=np.zeros((4, 1, 8, 8)))
    f["two_npz"] = root / "two.npz"
    np.savez(f["two_npz"], images=rng.random((2, 1, 8, 8), dtype=np.float32) * 2 - 1)
    f["rank2_npz"] = root / "rank2.npz"
    np.savez(f["rank2_npz"], images=np.zeros((4, 64), np.float32) - 1)

    d = 64
    f["nonpsd_stats"] = root / "nonpsd_stats.npz"
    sig = np.eye(d)
    sig[0, 0] = -5.0
    np.savez(f["nonpsd_stats"], mu=np.zeros(d), sigma=sig, extractor=np.array("fastgen-digits-classifier"))
    f["asym_stats"] = root / "asym_stats.npz"
    sig = np.eye(d)
    sig[0, 1] = 3.0
    np.savez(f["asym_stats"], mu=np.zeros(d), sigma=sig, extractor=np.array("fastgen-digits-classifier"))
    f["nan_stats"] = root / "nan_stats.npz"
    np.savez(f["nan_stats"], mu=np.full(d, np.nan), sigma=np.eye(d))
    f["shape_stats"] = root / "shape_stats.npz"
    np.savez(f["shape_stats"], mu=np.zeros(d), sigma=np.eye(d + 1))

    # Diffusers-looking folders with hostile or broken weights
    for name in ("pipe_pickle", "pipe_trunc"):
        p = root / name
        (p / "unet").mkdir(parents=True)
        (p / "scheduler").mkdir()
        (p / "model_index.json").write_text(json.dumps({
            "_class_name": "DDPMPipeline", "_diffusers_version": "0.30.0",
            "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
        (p / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
        (p / "unet" / "config.json").write_text(json.dumps({
            "_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
            "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}))
        f[name] = p
    (f["pipe_pickle"] / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": payload}))
    good = struct.pack("<Q", 2**20) + b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    (f["pipe_trunc"] / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(good[:40])

    # a training run whose checkpoint "safetensors" is a pickle (resume and load_model must refuse it)
    run = root / "run_pickle"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    from fastgen.commands._configs import resolve_config
    from fastgen.train.config import load_config, save_config

    save_config(load_config(resolve_config("mixture-edm", "train")), run / "config.yaml")
    (run / "checkpoints" / "step_1" / "state.json").write_text(json.dumps({"format": 1, "step": 1}))
    (run / "checkpoints" / "step_1" / "tensors.safetensors").write_bytes(pickle.dumps(payload))
    (run / "checkpoints" / "latest").write_text("step_1")
    f["run_pickle"] = run

    # an exported student whose JSON is binary bytes
    (root / "student_bin").mkdir()
    f["student_bin"] = root / "student_bin" / "stu.safetensors"
    f["student_bin"].write_bytes(b"\x00" * 16)
    (root / "student_bin" / "stu.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 8)

    # PNGs: a 16-bit grayscale image folder and its 8-bit twin (same content)
    from PIL import Image

    for sub in ("png16", "png8"):
        (root / sub).mkdir()
    for i in range(4):
        v16 = (rng.random((8, 8)) * 65535).astype(np.uint16)
        Image.fromarray(v16).save(root / "png16" / f"{i:03d}.png")
        Image.fromarray(np.round(v16 / 257).astype(np.uint8)).save(root / "png8" / f"{i:03d}.png")
    f["png16"], f["png8"] = root / "png16", root / "png8"
    (root / "mixed_png").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "mixed_png" / "a.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "mixed_png" / "b.png")
    f["mixed_png"] = root / "mixed_png"
    (root / "empty_dir").mkdir()
    f["empty_dir"] = root / "empty_dir"
    f["dotdot"] = root / "empty_dir" / ".." / ".." / "no_such_dir_xyz" / "x.npz"
    return f
