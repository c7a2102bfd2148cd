"""Which rows and which random numbers each shard of an optimizer step gets (process-count independent)."""

from __future__ import annotations

import torch

from fastgen.train.config import TrainConfig

__all__ = ["shard_seed", "build_dataset", "global_indices"]


def shard_seed(seed: int, step: int, shard: int) -> int:
    """A 63-bit seed for shard ``shard`` of optimizer step ``step`` (splitmix64-style mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + shard * 0x94D049BB133111EB + 1) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def build_dataset(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The in-memory training set named by ``cfg.data`` (:mod:`fastgen.data.registry`) as a dict of
    equal-length tensors."""
    from fastgen.data.registry import build_dataset as build_named_dataset

    return build_named_dataset(cfg.data.name, **cfg.data.options)


def global_indices(n: int, seed: int, step: int, batch_size: int) -> torch.Tensor:
    """Row indices of step ``step``'s global batch: epoch permutations seeded by ``(seed, epoch)``."""
    start = step * batch_size
    out = []
    pos = start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(shard_seed(seed, epoch, 2**20)))
        take = min(n - offset, start + batch_size - pos)
        out.append(perm[offset : offset + take])
        pos += take
    return torch.cat(out)
