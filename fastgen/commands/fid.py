"""``fastgen fid``, ``fastgen fid-stats`` and ``fastgen is``: evaluation from the command line.

Each image side is a folder of PNG/JPEG images, an ``.npz`` of images (``arr_0``/``images``/...,
NHWC or NCHW, uint8, uint16 or float; read lazily, batch by batch; the range of floats is
``--value-range`` or detected only when unambiguous, see :mod:`fastgen.data.images`) or
``digits:train|test|all``; a FID reference may also be
a statistics ``.npz`` (``mu``/``sigma``, as written by ``fid-stats``, pytorch-fid or EDM).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fastgen.data.images import VALUE_RANGES
from fastgen.io.devices import resolve_device
from fastgen.io.paths import check_output_path


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--features",
        default=None,
        choices=("inception", "digits"),
        help="feature network: InceptionV3 (FID) or the shipped digits classifier (FD_digits); default: the "
        "extractor recorded in a statistics REF, else inception",
    )
    p.add_argument(
        "--value-range",
        default="auto",
        choices=VALUE_RANGES,
        help="pixel range of float images: 0,1 (Diffusers pt/np output), -1,1 (fastgen), 0,255; default auto: "
        "integers by dtype, floats only when unambiguous (a minimum below -0.5 means -1,1)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="InceptionV3 FID weights (pt_inception-2015-12-05-6726825d.pth); default: "
        "$FASTGEN_INCEPTION_WEIGHTS, then the torch-hub cache. Never downloaded.",
    )
    p.add_argument(
        "--resize",
        default="tf",
        choices=("tf", "antialias", "none"),
        help="resize to 299 for Inception: TF1-compatible bilinear (published FIDs; default) or antialiased",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default=None, help="torch device for the feature network (default cpu)")
    p.add_argument(
        "--float64", action="store_true", help="run the Inception network in float64 (slower; batch-size independent)"
    )
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many images per side")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _kw(args: argparse.Namespace) -> dict:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_samples is not None and args.max_samples < 2:
        raise ValueError(f"--max-samples must be >= 2, got {args.max_samples}")
    return dict(
        batch_size=args.batch_size,
        device=resolve_device(args.device),
        value_range=args.value_range,
        report=lambda line: print(f"fastgen {args.command}: {line}", file=sys.stderr),
        inception_weights=args.inception_weights,
        resize=args.resize,
        max_samples=args.max_samples,
        progress=not args.no_progress,
        dtype=torch.float64 if args.float64 else torch.float32,
    )


def _print(args: argparse.Namespace, result: dict, text: str) -> None:
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(text)


def _run_fid(args: argparse.Namespace) -> int:
    from fastgen.metrics.compute import evaluate, resolve_features
    from fastgen.metrics.io import is_stats_file, load_stats

    args.features = resolve_features(args.features, args.ref, args.samples)
    if args.kid_subset_size < 2:
        raise ValueError(f"--kid-subset-size must be >= 2, got {args.kid_subset_size}")
    if args.save_stats is not None:
        check_output_path(args.save_stats, "--save-stats")
    metrics = ["fid"] + [m for m, on in (("kid", args.kid), ("pr", args.pr)) if on]
    kw = _kw(args)
    res = evaluate(
        args.samples,
        args.ref,
        args.features,
        metrics,
        kid_subset_size=args.kid_subset_size,
        pr_k=args.k,
        save_stats_to=args.save_stats,
        **kw,
    )
    res = {"features": args.features, **res}
    res["n_samples"] = int(res["n_samples"])
    label = "FID" if args.features == "inception" else "FD_" + args.features
    if args.samples.endswith(".npz") and is_stats_file(args.samples):
        extractor = load_stats(args.samples).meta.get("extractor", "")
        label = "FD_digits" if "digits" in extractor else "FID" if "inception" in extractor else "FD"
        res["features"] = extractor or "unknown"
    parts = [f"{label}: {res['fid']:.4f}"]
    if "kid_mean" in res:
        parts.append(f"KID: {res['kid_mean']:.6f} +- {res['kid_std']:.6f}")
    if "precision" in res:
        parts.append(f"precision: {res['precision']:.4f} recall: {res['recall']:.4f}")
    _print(args, res, "  ".join(parts) + f"  (N={res['n_samples']})")
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    from fastgen.metrics.compute import compute_reference_stats
    from fastgen.metrics.io import save_stats

    args.features = args.features or "inception"
    check_output_path(args.output, "--output")
    st = compute_reference_stats(args.source, args.features, **_kw(args))
    path = save_stats(args.output, st.mu, st.sigma, source=args.source, **st.meta)
    res = {"output": str(path), "count": st.count, "num_features": int(st.mu.shape[0]), **st.meta}
    _print(args, res, f"wrote {path} (mu/sigma of {st.count} images, d={st.mu.shape[0]}, {args.features})")
    return 0


def _run_is(args: argparse.Namespace) -> int:
    from fastgen.metrics.compute import evaluate

    if args.splits < 1:
        raise ValueError(f"--splits must be >= 1, got {args.splits}")
    args.features = args.features or "inception"
    res = evaluate(args.samples, None, args.features, ("is",), is_splits=args.splits, **_kw(args))
    res = {"features": args.features, "splits": args.splits, **res}
    res["n_samples"] = int(res["n_samples"])
    _print(
        args,
        res,
        f"IS: {res['is_mean']:.4f} +- {res['is_std']:.4f}  (N={res['n_samples']}, {args.splits} splits)",
    )
    return 0


def _quiet(run):
    """Run ``run(args)`` with SmallSampleWarning silenced: the ``report`` callback already printed it as one line."""

    def wrapped(args: argparse.Namespace) -> int:
        import warnings

        from fastgen.metrics.compute import SmallSampleWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallSampleWarning)
            return run(args)

    return wrapped


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fid``, ``fid-stats`` and ``is`` to the ``fastgen`` command line."""
    p = subparsers.add_parser(
        "fid",
        help="FID (or FD_digits) between generated images and a reference",
        description="Frechet distance between SAMPLES and REF. Each is a folder of PNG/JPEG images, an .npz "
        "of images or digits:train|test|all; REF may also be a statistics .npz (mu/sigma).",
    )
    p.add_argument("samples", help="generated images: folder, .npz or digits:<split>")
    p.add_argument("ref", help="reference: folder, images .npz, statistics .npz or digits:<split>")
    _add_common(p)
    p.add_argument("--kid", action="store_true", help="also report KID (needs reference images)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)")
    p.add_argument("--pr", action="store_true", help="also report precision/recall (k-NN, needs reference images)")
    p.add_argument("--k", type=int, default=3, help="k of the precision/recall k-NN balls (default 3)")
    p.add_argument("--save-stats", default=None, metavar="PATH", help="also save the samples' statistics (.npz)")
    p.set_defaults(func=_quiet(_run_fid))

    s = subparsers.add_parser(
        "fid-stats",
        help="write reference statistics (mu/sigma .npz) of a folder, .npz or data set",
        description="Compute feature statistics of SOURCE and save them as an .npz with mu, sigma and "
        "metadata (readable by pytorch-fid and EDM tools).",
    )
    s.add_argument("source", help="images: folder, .npz or digits:train|test|all")
    s.add_argument("-o", "--output", required=True, help="output .npz path")
    _add_common(s)
    s.set_defaults(func=_quiet(_run_stats))

    i = subparsers.add_parser(
        "is",
        help="Inception Score of generated images",
        description="Inception Score from the 1008-way logits_unbiased (or the digits classifier's logits).",
    )
    i.add_argument("samples", help="generated images: folder, .npz or digits:<split>")
    _add_common(i)
    i.add_argument("--splits", type=int, default=10, help="number of splits (default 10)")
    i.set_defaults(func=_quiet(_run_is))


if __name__ == "__main__":  # pragma: no cover
    from fastgen.cli import main

    sys.exit(main(["fid", *sys.argv[1:]]))
