"""Exponential moving averages of networks, on :class:`torch.optim.swa_utils.AveragedModel`.

``make_ema(net, decay, warmup)`` returns an ``AveragedModel`` whose update is
``ema <- ema + (1 - d_n) (net - ema)`` with ``d_n = min(decay, (1 + n) / (10 + n))`` when ``warmup``
(n = number of updates so far; the first update copies the weights), else ``d_n = decay``. Buffers are
averaged too (``use_buffers=True``). ``ema.module`` is the averaged network; ``ema.state_dict()``
holds the weights and ``n_averaged`` (so exact resume restores the warm-up position).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["make_ema", "ema_decay"]


def ema_decay(decay: float, n: int, warmup: bool = True) -> float:
    """The decay used at update number ``n`` (0-based count of previous updates)."""
    return min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay


def _warmup_multi_avg_fn(decay: float):
    @torch.no_grad()
    def fn(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        d = ema_decay(decay, int(num_averaged), True)
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return fn


def make_ema(net: nn.Module, decay: float = 0.999, warmup: bool = True) -> AveragedModel:
    """An EMA copy of ``net`` (deep copy, ``requires_grad=False``); call ``update_parameters(net)``."""
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    fn = _warmup_multi_avg_fn(decay) if warmup else get_ema_multi_avg_fn(decay)
    ema = AveragedModel(net, multi_avg_fn=fn, use_buffers=True)
    ema.requires_grad_(False)
    return ema
