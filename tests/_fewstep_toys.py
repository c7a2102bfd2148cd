"""Shared toys for the SFD and BOSS tests: the exact ring-mixture denoiser with a zero-initialised learnable
correction (so a student starts exactly at the exact denoiser), and a Trainer config for data-free methods."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import sigma_batch
from fastgen.data.toy import ring_mixture
from fastgen.train.config import config_from_dict


class CorrectedDenoiser(nn.Module):
    """``D(x, sigma) = D_exact(x, sigma) + c_out(sigma) MLP(c_in x, log(sigma)/4)``, the MLP's output layer
    zero-initialised: at iteration 0 it is the exact mixture denoiser."""

    def __init__(self, exact: nn.Module, dim: int = 2, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.exact = exact.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(dim + 1, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)
        with torch.no_grad():
            for lin in (self.inp, self.mid):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
                lin.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()
        self.inputs: list[torch.Tensor] = []  # the x of every call (for the detached-chain check)

    def forward(self, x: torch.Tensor, sigma: Any, **cond: Any) -> torch.Tensor:
        self.inputs.append(x)
        s = sigma_batch(sigma, x)[:, None]
        h = torch.cat([x / (1 + s**2).sqrt(), s.log() / 4], dim=1)
        h = self.mid(nn.functional.silu(self.inp(h)))
        corr = self.out(nn.functional.silu(h)) * (s / (1 + s**2).sqrt())
        return self.exact(x, sigma, **cond) + corr


def ring_exact() -> nn.Module:
    """The exact denoiser of the card's 2-D mixture: 8 modes, radius 3, std 0.15."""
    return ring_mixture(8, 3.0, 0.15).denoiser().float()


def data_free_config(tmp: Any, steps: int, batch: int = 64, lr: float = 1e-3, **extra: Any):
    """A TrainConfig for a method built in Python (data ``none``; method name only recorded)."""
    doc = {"name": "toy", "output_dir": str(tmp), "seed": 0, "steps": steps, "batch_size": batch,
           "progress": False, "log_every": 1, "checkpoint_every": 1000, "data": {"name": "none", "num_samples": 4096},
           "network": {"kind": "mlp"}, "method": {"name": "sfd"}, "ema": {"decay": 0.0, "warmup": False},
           "optim": {"lr": lr, "grad_clip": None}}
    doc.update(extra)
    return config_from_dict(doc)
