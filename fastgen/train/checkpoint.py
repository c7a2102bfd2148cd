"""Re-export of :mod:`fastgen.io.checkpoint` (the checkpoint I/O lives in ``fastgen.io``); import from there."""

from fastgen.io.checkpoint import *  # noqa: F403
from fastgen.io.checkpoint import __all__  # noqa: F401
