"""The contract between a training *method* and the :class:`~fastgen.train.trainer.Trainer`.

A method owns its networks and computes named losses; the trainer owns optimizers, devices,
mixed precision, gradient accumulation, EMA, checkpoints and logging.

- ``networks()`` returns the trainable modules by name. Each name that appears in
  ``optimizer_groups()`` gets its own optimizer (``"main"`` for single-network methods).
- ``optimizer_groups()`` maps an optimizer name to the network names it updates, e.g.
  ``{"main": ["net"]}`` or, for f-distill, ``{"student": ["student"], "critic": ["fake_score", "disc"]}``.
- ``ema_networks()`` names the networks whose EMA the trainer keeps (``[]`` for none).
- ``frozen()`` returns modules the method uses but never trains (teachers); the trainer moves them
  to the device and keeps them out of checkpoints.
- ``step(batch, step, generator)`` returns an ordered mapping ``{optimizer_name: loss}`` of the
  scalar losses to minimise at this step. The trainer, for each item in order, zeroes all grads,
  backpropagates that loss and steps that optimizer only (so an alternating schedule such as
  "critic every step, student every k-th step" is expressed by which names the method returns).
  Extra scalars to log go in ``self.last_logs`` (a dict of floats) and are written to the metrics log.
- ``state_dict()/load_state_dict()`` hold non-network state (e.g. f-distill's ratio bins) that
  exact resume needs; tensors only (they are saved as safetensors).
- ``batch`` is what the data loader yields (a dict of tensors, e.g. ``{"x": images, "label": labels}``),
  already on the trainer's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn


class Method(Protocol):
    last_logs: dict[str, float]

    def networks(self) -> Mapping[str, nn.Module]: ...

    def optimizer_groups(self) -> Mapping[str, list[str]]: ...

    def ema_networks(self) -> list[str]: ...

    def frozen(self) -> Mapping[str, nn.Module]: ...

    def step(
        self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> Mapping[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
