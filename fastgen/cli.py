"""The ``fastgen`` command line. Each subcommand lives in ``fastgen/commands/<name>.py`` and
exposes ``register(subparsers)``, which adds its parser and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

from fastgen import __version__

#: Subcommand modules, in the order ``fastgen --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = ("demo", "sample", "schedule", "train", "distill", "fid")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgen",
        description="Fast generation for diffusion and flow models: samplers, schedules, distillation, metrics.",
    )
    parser.add_argument("--version", action="version", version=f"fastgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"fastgen.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if getattr(args, "device", None) is not None:  # one resolver for every --device (cpu, cuda[:N], mps, auto)
            from fastgen.io.devices import resolve_device

            args.device = str(resolve_device(args.device))
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"fastgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # FileExistsError, NotADirectoryError, ...: str(err) names the path
        print(f"fastgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a failure during the run (e.g. NaN in a network): exit 1
        print(f"fastgen {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
