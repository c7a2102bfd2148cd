"""Samplers over the sigma-space core, and drop-in Diffusers schedulers.

- :func:`restart_sample` -- Restart sampling (Xu et al. 2023) over a denoiser.
- :class:`RestartScheduler` -- the same algorithm inside any Diffusers pipeline.
- :class:`FastgenScheduler` -- any fastgen schedule with any fastgen solver inside a pipeline.

The scheduler classes are imported lazily, so ``import fastgen.samplers.<module>`` does not import
Diffusers.
"""

from __future__ import annotations

from typing import Any

from fastgen.samplers.restart import restart_sample

__all__ = ["FastgenScheduler", "RestartScheduler", "restart_sample"]


def __getattr__(name: str) -> Any:
    if name == "RestartScheduler":
        from fastgen.samplers.restart_scheduler import RestartScheduler

        return RestartScheduler
    if name == "FastgenScheduler":
        from fastgen.samplers.fastgen_scheduler import FastgenScheduler

        return FastgenScheduler
    raise AttributeError(f"module 'fastgen.samplers' has no attribute {name!r}")
