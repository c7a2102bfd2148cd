"""Where f-distill's discriminator reads: one small object per placement (``teacher``, ``fake_score``,
``input``), so :class:`~fastgen.distill.fdistill.FDistill` never switches on the placement name.

Each placement answers three questions for a method ``m`` (an ``FDistill``; ``m.tap`` is its
:class:`~fastgen.distill.discriminator.FeatureTap` or None, ``m.disc`` its head module):

- :meth:`Placement.build` -- the tap and the head for a probe batch;
- :meth:`Placement.student_logits` -- logits (B, heads) for the generator step, with the predictions of
  the network whose features were read (``(logits, d_teacher, d_fake)``, None where not computed);
- :meth:`Placement.critic_logits` -- logits for the critic step with the head's graph (and the fake
  score's prediction when its pass produced the features, else None). Frozen-teacher features are read
  without a graph: the heads come after them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastgen.distill.discriminator import FeatureDiscriminator, FeatureTap, XSigmaDiscriminator

__all__ = ["Placement", "get_placement"]

Logits3 = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


class Placement:
    """Heads on the features of a backbone network (``teacher`` or ``fake_score``)."""

    name = "teacher"

    def backbone(self, m: Any) -> nn.Module | None:
        return m.teacher

    def build(self, m: Any, xt: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any],
              discriminator: nn.Module | None = None) -> tuple[FeatureTap | None, nn.Module]:
        tap = FeatureTap(self.backbone(m), m.config.feature_layers)
        if discriminator is not None:
            return tap, discriminator
        return tap, FeatureDiscriminator.from_probe(self.backbone(m), tap, xt, sigma, **cond)

    def _pass(self, m: Any, net: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
              cond: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with m.tap.capture() as feats:
            out = net(x_t, sigma, **cond)
        return m.disc(feats), out

    def student_logits(self, m: Any, x_t: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]) -> Logits3:
        logits, d_teacher = self._pass(m, m.teacher, x_t, sigma, cond)
        return logits, d_teacher, None

    def critic_logits(self, m: Any, x_t: torch.Tensor, sigma: torch.Tensor,
                      cond: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad(), m.tap.capture() as feats:
            m.teacher(x_t, sigma, **cond)
        return m.disc({k: v.detach() for k, v in feats.items()}), None


class FakeScorePlacement(Placement):
    """Heads on the trainable fake score's features (its pass also gives its prediction)."""

    name = "fake_score"

    def backbone(self, m: Any) -> nn.Module | None:
        return m.fake_score

    def student_logits(self, m: Any, x_t: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]) -> Logits3:
        logits, d_fake = self._pass(m, m.fake_score, x_t, sigma, cond)
        return logits, None, d_fake

    def critic_logits(self, m: Any, x_t: torch.Tensor, sigma: torch.Tensor,
                      cond: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._pass(m, m.fake_score, x_t, sigma, cond)


class InputPlacement(Placement):
    """A head on ``(x_t, log sigma)`` itself, for teachers without features (exact mixtures)."""

    name = "input"

    def backbone(self, m: Any) -> nn.Module | None:
        return None

    def build(self, m: Any, xt: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any],
              discriminator: nn.Module | None = None) -> tuple[FeatureTap | None, nn.Module]:
        cfg = m.config
        if discriminator is not None:
            return None, discriminator
        return None, XSigmaDiscriminator(math.prod(cfg.sample_shape), cfg.disc_hidden, sigma_data=cfg.sigma_data)

    def student_logits(self, m: Any, x_t: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]) -> Logits3:
        return m.disc(x_t, sigma), None, None

    def critic_logits(self, m: Any, x_t: torch.Tensor, sigma: torch.Tensor,
                      cond: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return m.disc(x_t, sigma), None


_PLACEMENTS: dict[str, Placement] = {p.name: p for p in (Placement(), FakeScorePlacement(), InputPlacement())}


def get_placement(name: str) -> Placement:
    """The placement object for ``name`` (one of :data:`fastgen.distill.fconfig.PLACEMENTS`)."""
    if name not in _PLACEMENTS:
        raise ValueError(f"placement must be one of {tuple(_PLACEMENTS)}, got {name!r}")
    return _PLACEMENTS[name]
