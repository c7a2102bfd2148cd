"""Shared pytest setup: the test suite runs offline, on CPU, with few threads and fixed seeds.

- ``tests/`` is put on ``sys.path`` so test files can ``from _tiny_models import ...``.
- Hub access is switched off (``HF_HUB_OFFLINE``), so nothing can be downloaded by accident.
- Every test starts from ``torch.manual_seed(0)``; tests that need randomness should still use an
  explicit ``torch.Generator``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
