"""Samplers over the sigma-space core, and drop-in Diffusers schedulers.

- :func:`restart_sample` -- Restart sampling (Xu et al. 2023) over a denoiser.
- :class:`RestartScheduler` -- the same algorithm inside any Diffusers pipeline.
- :class:`FastgenScheduler` -- any fastgen schedule with any fastgen solver inside a pipeline.
"""

from fastgen.samplers.fastgen_scheduler import FastgenScheduler
from fastgen.samplers.restart import restart_sample
from fastgen.samplers.restart_scheduler import RestartScheduler

__all__ = ["FastgenScheduler", "RestartScheduler", "restart_sample"]
