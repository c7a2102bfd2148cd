"""``fastgen --help`` and ``fastgen --version`` through ``fastgen.cli.main`` and the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import fastgen
from fastgen.cli import main


def test_version_via_main(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastgen {fastgen.__version__}"
    assert fastgen.__version__.count(".") >= 2


def test_help_via_main(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastgen") and "--version" in out
    # no subcommand: prints the help and succeeds
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("usage: fastgen")


def test_unknown_command_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script() -> None:
    eps = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "fastgen"]
    assert [ep.value for ep in eps] == ["fastgen.cli:main"]
    script = Path(sys.executable).parent / ("fastgen.exe" if os.name == "nt" else "fastgen")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == f"fastgen {fastgen.__version__}"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("usage: fastgen")
