"""Shortcut models (Frans, Hafner, Levine, Abbeel, ICLR 2025): one network, 1 to M sampling steps.

Conventions (see :mod:`fastgen.samplers.shortcut` for the conversion to VE sigma):

- **Flow direction:** t = 0 is noise ``x0 ~ N(0, I)``, t = 1 is data ``x1``;
  ``x_t = (1 - (1 - 1e-5) t) x0 + t x1``, flow-matching target ``x1 - (1 - 1e-5) x0``.
- **Step sizes:** ``d in {1, 1/2, ..., 1/M}`` with ``M = max_steps`` (128 by default). The
  flow-matching rows use ``d = 1/M`` (the released code's convention; d = 0 is never fed).
- **d input convention (fastgen's choice):** :class:`ShortcutNet` feeds the backbone the real number
  ``d_in = log2(1/d) / log2(M)`` in [0, 1] -- 0 for the one-step jump d = 1, 1 for the flow-matching
  step d = 1/M -- rather than the official integer ``log2(1/d)`` (an embedder built for [0, 1] then
  receives [0, 1]). Training and sampling both go through :meth:`ShortcutNet.d_input`; ``t`` is fed raw
  in [0, 1].
- **Batch:** ``B_b = B // bootstrap_every`` bootstrap rows (default 1/8 as in the released code) and
  ``B - B_b`` flow rows. Bootstrap levels ``k = log2(1/d)`` are assigned in equal descending chunks of
  ``B_b // L`` rows, ``k = L-1, ..., 0`` (L = log2 M), leftovers to k = 0 (d = 1). **Guard:** when
  ``B_b < L`` the chunks would be empty (every row d = 1); fastgen then assigns levels round-robin with
  an offset that rotates with the step, so every level is still trained (``strict_levels=True`` raises).
- **Target** (EMA weights, no gradient): ``v1 = s_ema(x_t, t, d/2)``,
  ``x' = clip(x_t + d/2 v1, -4, 4)``, ``v2 = s_ema(x', t + d/2, d/2)``, ``target = clip((v1+v2)/2, -4, 4)``;
  bootstrap t on the d-grid with ``t + d <= 1``; flow t on the 1/M grid (never t = 1).
- **EMA target network:** the method keeps its *own* frozen EMA copy (``target_net``, decay 0.999 with
  an optional warm-up ``min(decay, (1 + n) / (10 + n))``), updated at the start of every ``step`` from
  the online weights. It is listed in ``frozen()`` (so the trainer moves it to the device) and its
  tensors are in ``state_dict()`` (so exact resume restores it). This keeps the method independent of the
  trainer's evaluation EMA (``ema_networks()``), which may use another decay.
- **Labels:** flow rows drop labels to ``null_label`` with probability ``label_dropout``; bootstrap rows
  keep them. Optional training-time CFG (``bootstrap_cfg_scale = w``) applies ``v_u + w (v_c - v_u)``
  to both half-step velocities of the smallest bootstrap level only (d = 2/M).
- **Loss:** the batch mean of per-row MSE (mean over pixels), all rows weighted equally.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastgen.models.shortcut import ShortcutNet, num_levels
from fastgen.samplers.guidance import guidance_combine
from fastgen.train.method import register_method

__all__ = ["ShortcutMethod", "ShortcutNet", "assign_levels", "bootstrap_target", "from_config"]

FM_SIGMA_MIN = 1e-5


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def assign_levels(num_boot: int, levels: int, step: int = 0, strict: bool = False) -> torch.Tensor:
    """Bootstrap levels ``k = log2(1/d)`` (long, (num_boot,)) for the bootstrap rows.

    Equal descending chunks of ``num_boot // levels`` rows (``k = levels-1, ..., 0``), leftovers k = 0.
    If ``num_boot < levels`` (empty chunks): ValueError when ``strict``, else round-robin
    ``k = (levels - 1 - (i + step)) mod levels`` so all levels are visited across steps.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if num_boot < 0:
        raise ValueError(f"num_boot must be >= 0, got {num_boot}")
    if num_boot < levels:
        if strict:
            raise ValueError(
                f"batch_size: the bootstrap part has {num_boot} rows but needs >= {levels} (one per level); "
                "increase the batch size or lower bootstrap_every"
            )
        i = torch.arange(num_boot)
        return (levels - 1 - (i + step)) % levels
    chunk = num_boot // levels
    k = torch.zeros(num_boot, dtype=torch.long)
    for j in range(levels):
        k[j * chunk : (j + 1) * chunk] = levels - 1 - j
    return k


@torch.no_grad()
def bootstrap_target(
    model: nn.Module | Any,
    x_t: torch.Tensor,
    t: torch.Tensor,
    d: torch.Tensor,
    *,
    clip: float | None = 4.0,
    cfg_scale: float | None = None,
    cfg_mask: torch.Tensor | None = None,
    uncond: Mapping[str, Any] | None = None,
    **cond: Any,
) -> torch.Tensor:
    """The self-consistency target for a jump of size ``d`` from two half steps of ``model`` (no grad).

    ``v1 = s(x_t, t, d/2)``, ``x' = clip(x_t + d/2 v1)``, ``v2 = s(x', t + d/2, d/2)``,
    ``target = clip((v1 + v2) / 2)`` with clips at ``+-clip`` (``None`` disables them). With
    ``cfg_scale = w`` the rows in ``cfg_mask`` (bool (B,)) use ``v_u + w (v_c - v_u)`` for both half
    steps, ``v_u`` from ``model(..., **{**cond, **uncond})``. ``t``, ``d``: (B,) shortcut times / sizes.
    """
    half = d / 2

    def vel(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        v = model(x, tt, half, **cond)
        if cfg_scale is not None and cfg_mask is not None and bool(cfg_mask.any()):
            m = cfg_mask

            def rows(kw: Mapping[str, Any]) -> dict[str, Any]:
                return {k: (a[m] if isinstance(a, torch.Tensor) and a.ndim >= 1 else a) for k, a in kw.items()}

            sub, un = rows(cond), rows(uncond or {})
            vc = v[m]
            vu = model(x[m], tt[m], half[m], **{**sub, **un})
            v = v.clone()
            v[m] = guidance_combine(vc, vu, cfg_scale)
        return v

    v1 = vel(x_t, t)
    x_mid = x_t + _bcast(half, x_t) * v1
    if clip is not None:
        x_mid = x_mid.clamp(-clip, clip)
    v2 = vel(x_mid, t + half)
    target = (v1 + v2) / 2
    if clip is not None:
        target = target.clamp(-clip, clip)
    return target


class ShortcutMethod:
    """The shortcut-model training method (fastgen ``Method`` protocol); see the module docstring.

    Args:
        model: a :class:`ShortcutNet` (or any module ``s(x_t, t, d, **cond)`` with ``max_steps``).
        bootstrap_every: 1/fraction of bootstrap rows (8 = 1/8 of the batch, the released code); 0
            disables bootstrapping (plain flow matching at d = 1/M, the baseline).
        num_classes: number of classes for a class-conditional model (``batch["label"]``), or None.
        null_label: the label index meaning "no class" (default ``num_classes``).
        label_dropout: probability of the null label on flow rows, in [0, 1].
        ema_decay: decay of the bootstrap-target EMA, in [0, 1); ``ema_warmup`` uses
            ``min(decay, (1+n)/(10+n))`` at update n.
        clip: the +-clip of the target builder (4 in the recipe; None disables).
        bootstrap_cfg_scale: training-time CFG scale on the smallest bootstrap level (None: off).
        strict_levels: raise instead of the round-robin fallback when ``B_b < log2(M)``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        bootstrap_every: int = 8,
        num_classes: int | None = None,
        null_label: int | None = None,
        label_dropout: float = 0.1,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        clip: float | None = 4.0,
        bootstrap_cfg_scale: float | None = None,
        strict_levels: bool = False,
    ) -> None:
        max_steps = getattr(model, "max_steps", None)
        if max_steps is None:
            raise ValueError("model must expose max_steps (wrap the backbone in ShortcutNet)")
        if bootstrap_every < 0:
            raise ValueError(f"bootstrap_every must be >= 0 (0 = flow matching only), got {bootstrap_every}")
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        if bootstrap_cfg_scale is not None and num_classes is None:
            raise ValueError("bootstrap_cfg_scale needs a class-conditional model (num_classes)")
        self.model = model
        self.max_steps = int(max_steps)
        self.levels = num_levels(self.max_steps)
        self.bootstrap_every = int(bootstrap_every)
        self.num_classes = num_classes
        self.null_label = (num_classes if null_label is None else int(null_label)) if num_classes else None
        self.label_dropout = float(label_dropout)
        self.ema_decay = float(ema_decay)
        self.ema_warmup = bool(ema_warmup)
        self.clip = clip
        self.bootstrap_cfg_scale = bootstrap_cfg_scale
        self.strict_levels = bool(strict_levels)
        self.target_net = copy.deepcopy(model).requires_grad_(False).eval()
        self.ema_updates = 0
        self._last_update_step: int | None = None
        self.last_logs: dict[str, float] = {}

    # -- Method protocol ---------------------------------------------------------------------
    def networks(self) -> Mapping[str, nn.Module]:
        return {"net": self.model}

    def optimizer_groups(self) -> Mapping[str, list[str]]:
        return {"main": ["net"]}

    def ema_networks(self) -> list[str]:
        return ["net"]

    def frozen(self) -> Mapping[str, nn.Module]:
        return {"target_net": self.target_net}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"target_net.{k}": v.detach().clone() for k, v in self.target_net.state_dict().items()}
        state["ema_updates"] = torch.tensor(self.ema_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sub = {k[len("target_net.") :]: v for k, v in state.items() if k.startswith("target_net.")}
        if sub:
            self.target_net.load_state_dict(sub)
        if "ema_updates" in state:
            self.ema_updates = int(state["ema_updates"])

    # -- EMA ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update_target(self) -> float:
        """One EMA update of ``target_net`` from the online model; returns the decay used."""
        n = self.ema_updates
        decay = min(self.ema_decay, (1 + n) / (10 + n)) if self.ema_warmup else self.ema_decay
        if n == 0:
            decay = 0.0  # start exactly at the online weights
        online = dict(self.model.named_parameters())
        for name, p in self.target_net.named_parameters():
            p.lerp_(online[name].detach().to(p.dtype), 1 - decay)
        online_b = dict(self.model.named_buffers())
        for name, b in self.target_net.named_buffers():
            b.copy_(online_b[name])
        self.ema_updates += 1
        return decay

    # -- batch construction ------------------------------------------------------------------
    def split(self, batch_size: int) -> int:
        """Number of bootstrap rows ``B // bootstrap_every`` (0 when bootstrapping is off)."""
        return batch_size // self.bootstrap_every if self.bootstrap_every else 0

    def make_batch(
        self, x1: torch.Tensor, labels: torch.Tensor | None, step: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Build inputs and targets: ``x_t, t, d, labels, target, is_boot, level`` (rows: bootstrap first)."""
        dev = x1.device
        gdev = generator.device
        b = x1.shape[0]
        nb = self.split(b)
        m = self.max_steps
        x0 = torch.randn(x1.shape, generator=generator, device=gdev, dtype=x1.dtype).to(dev)
        # flow rows: t on the 1/M grid, d = 1/M
        t_flow = torch.randint(0, m, (b - nb,), generator=generator, device=gdev).to(dev, x1.dtype) / m
        # bootstrap rows: level k, d = 2^-k, t = randint(0, 1/d) * d
        level = assign_levels(nb, self.levels, step, self.strict_levels).to(dev)
        d_boot = torch.pow(2.0, -level.to(x1.dtype))
        n_cells = torch.pow(2, level)  # 1/d
        u = torch.rand(nb, generator=generator, device=gdev, dtype=torch.float64).to(dev)
        t_boot = torch.floor(u * n_cells.double()).to(x1.dtype) * d_boot
        t = torch.cat([t_boot, t_flow])
        d = torch.cat([d_boot, torch.full((b - nb,), 1.0 / m, device=dev, dtype=x1.dtype)])
        tb = _bcast(t, x1)
        x_t = (1 - (1 - FM_SIGMA_MIN) * tb) * x0 + tb * x1
        is_boot = torch.zeros(b, dtype=torch.bool, device=dev)
        is_boot[:nb] = True
        out: dict[str, torch.Tensor] = {"x_t": x_t, "t": t, "d": d, "is_boot": is_boot, "level": level}
        cond: dict[str, Any] = {}
        if self.num_classes is not None:
            if labels is None:
                raise ValueError("batch must contain 'label' for a class-conditional shortcut model")
            labels = labels.to(dev).long()
            drop = torch.rand(b, generator=generator, device=gdev).to(dev) < self.label_dropout
            drop &= ~is_boot
            out["labels"] = torch.where(drop, torch.full_like(labels, self.null_label), labels)
            cond = {"class_labels": labels[:nb]}
        target = (x1 - (1 - FM_SIGMA_MIN) * x0).clone()
        if nb:
            cfg_mask = level[:nb] == self.levels - 1 if self.bootstrap_cfg_scale is not None else None
            uncond = {"class_labels": torch.full((nb,), self.null_label, device=dev)} if cfg_mask is not None else None
            target[:nb] = bootstrap_target(
                self.target_net, x_t[:nb], t_boot, d_boot, clip=self.clip,
                cfg_scale=self.bootstrap_cfg_scale, cfg_mask=cfg_mask, uncond=uncond, **cond,
            )
        out["target"] = target
        return out

    def step(
        self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> Mapping[str, torch.Tensor]:
        """One loss ``{"main": mean_rows(mean_pixels((s(x_t, t, d, y) - target)^2))}``."""
        x1 = batch["x"]
        if self._last_update_step != step:  # once per optimizer step, also under gradient accumulation
            self.update_target()
            self._last_update_step = step
        inp = self.make_batch(x1, batch.get("label"), step, generator)
        cond = {"class_labels": inp["labels"]} if "labels" in inp else {}
        v = self.model(inp["x_t"], inp["t"], inp["d"], **cond)
        per_row = ((v.float() - inp["target"].float()) ** 2).reshape(v.shape[0], -1).mean(1)
        loss = per_row.mean()
        boot = inp["is_boot"]
        per_row = per_row.detach()
        self.last_logs = {
            "flow_loss": float(per_row[~boot].mean()) if (~boot).any() else 0.0,
            "bootstrap_loss": float(per_row[boot].mean()) if boot.any() else 0.0,
        }
        return {"main": loss}


def from_config(cfg: Any) -> ShortcutMethod:
    """Factory for ``method: {name: shortcut, max_steps: 128, d_key: d, ...ShortcutMethod kwargs}``.

    Builds ``cfg.network`` (which must declare the scalar ``d_key``, e.g. ``scalars: [d]``) and wraps it in
    :class:`ShortcutNet`; the trainer's EMA of ``"net"`` therefore has ``backbone.``-prefixed keys.
    """
    from fastgen.models.nets import build_network
    from fastgen.train.method import check_kwargs, method_kwargs

    kw = method_kwargs(cfg)
    max_steps = int(kw.pop("max_steps", 128))
    d_key = str(kw.pop("d_key", "d"))
    check_kwargs(ShortcutMethod.__init__, kw, "shortcut method")
    net_kw = dict(cfg.network)
    if d_key not in tuple(net_kw.get("scalars", ())):
        raise ValueError(f"network.scalars must include {d_key!r} for a shortcut model, got {net_kw.get('scalars')}")
    if "num_classes" not in kw and net_kw.get("num_classes"):
        kw["num_classes"] = int(net_kw["num_classes"])
    backbone = build_network(net_kw.pop("kind"), **net_kw)
    return ShortcutMethod(ShortcutNet(backbone, max_steps, d_key), **kw)


register_method("shortcut", from_config)
