"""Reflow (2-rectified flow) and its one-/k-step distillation (Liu, Gong, Liu, ICLR 2023) on the shared Trainer.

``method: {name: reflow, teacher: SOURCE, ...}``. At construction the method loads the teacher through
:func:`fastgen.models.load_model` (any EDM-contract denoiser: a flow model such as ``digits-flow``, a training
run, an EDM teacher, a mixture spec's exact denoiser), draws ``num_pairs`` couplings ``(z0, z1 = ODE(z0))``
(:func:`fastgen.train.reflow_pairs.generate_pairs`, with any fastgen solver), and fine-tunes a rectified-flow
velocity net ``net(x_t, t, class_labels=None) -> v`` on them (conventions of :mod:`fastgen.train.flow`:
``t = 0`` noise, ``x_t = (1 - t) z0 + t z1``):

- **reflow** (``distill_steps: 0``): ``L = E_{t ~ U[eps, 1]} ||v(t z1 + (1 - t) z0, t) - (z1 - z0)||^2``;
  the teacher's flow becomes straighter (its 2-rectified flow), so few-step Euler improves.
- **k-step distillation** (``distill_steps: k >= 1``): the same loss with ``t`` drawn from the grid
  ``{0, 1/k, ..., (k-1)/k} (1 - eps) + eps`` only (the RF code's ``reflow_t_schedule = k``). ``k = 1`` is the
  one-step map: ``t = eps`` only, trained on pairs of the (straightened) teacher; its result is valid only for
  ``k``-step Euler sampling on that grid, not as an ODE (card pitfall 4).

``loss``: ``l2`` (mean squared velocity error, the RF ``l2`` option and InstaFlow's stage 1) or ``pseudo_huber``
(per row ``sqrt(||r||^2 + c^2) - c`` with ``c = 0.00054 sqrt(dim)``, the iCT choice) -- the offline
substitutes for LPIPS (card section 7). ``init: teacher`` starts from the teacher's velocity net (the teacher
must be a rectified-flow model whose net has the config's ``network``); ``init: scratch`` from the config's
fresh network. The trainer's EMA starts fresh from the initial weights.

The data section must be ``{name: none, num_samples: num_pairs}``: a batch's ``index`` rows pick pairs (so the
trainer's epoch permutation, resume and multi-process sharding apply unchanged). The pairs are cached in
``<output_dir>/reflow_pairs.safetensors`` with their specification; a resumed run reloads them (bit-exact), and
a file whose specification differs is regenerated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import RectifiedFlowDenoiser
from fastgen.train.edm import drop_labels
from fastgen.train.method import SingleNetworkMethod, register_method
from fastgen.train.reflow_pairs import PAIR_SCHEDULES, RF_SIGMA_MAX, generate_pairs

__all__ = ["ReflowMethod", "REFLOW_LOSSES", "reflow_loss", "check_options", "check_pair_spec", "PAIRS_FILE",
           "from_config"]

REFLOW_LOSSES = ("l2", "pseudo_huber")
INITS = ("teacher", "scratch")
PAIRS_FILE = "reflow_pairs.safetensors"


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def reflow_loss(
    net: nn.Module, z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor, loss: str = "l2", start_t: float = 0.0,
    **cond: Any,
) -> torch.Tensor:
    """Scalar reflow loss: ``v(x_t, t)`` against ``z1 - z0`` at ``x_t = t z1 + (1 - t) z0``; ``t`` (B,).

    ``start_t = a > 0``: the straight path from the sampler's actual start ``x_a = (1 - a) z0`` (VE
    ``sigma_max z0`` with ``a = 1 / (1 + sigma_max)``) to ``z1`` over ``[a, 1]``: ``x_t = (1 - s) x_a + s z1``
    with ``s = (t - a) / (1 - a)``, target ``(z1 - x_a) / (1 - a)``. For a teacher with a small ``sigma_max``
    (a VP pipeline: 14.6, ``a = 0.064``) the ``a = 0`` path would show the student ``a z1`` of the answer at
    its first step, which the sampler never has. ``a = 0`` is the RF code's path."""
    tb = _bcast(t, z1).to(z1.dtype)
    if start_t:
        a = float(start_t)
        xa = (1 - a) * z0
        sb = (tb - a) / (1 - a)
        x_t, target = (1 - sb) * xa + sb * z1, (z1 - xa) / (1 - a)
    else:
        x_t, target = tb * z1 + (1 - tb) * z0, z1 - z0
    v = net(x_t, t.to(z1.dtype), **cond)
    dt = torch.promote_types(z1.dtype, torch.float32)
    r = (v.to(dt) - target.to(dt)).reshape(z1.shape[0], -1)
    if loss == "l2":
        return (r**2).mean(dim=1).mean()
    if loss == "pseudo_huber":
        c = 0.00054 * math.sqrt(r.shape[1])
        return ((r.pow(2).sum(dim=1) + c * c).sqrt() - c).mean()
    raise ValueError(f"loss must be one of {REFLOW_LOSSES}, got {loss!r}")


def check_options(distill_steps: int = 0, eps: float = 1e-3, loss: str = "l2", label_dropout: float = 0.0,
                  start_t: float = 0.0, end_t: float = 1.0) -> None:
    """``ValueError`` naming the first invalid :class:`ReflowMethod` option (checked before pairs are drawn)."""
    if not isinstance(distill_steps, int) or isinstance(distill_steps, bool) or distill_steps < 0:
        raise ValueError(f"distill_steps must be an int >= 0 (0 = reflow), got {distill_steps!r}")
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    if loss not in REFLOW_LOSSES:
        raise ValueError(f"loss must be one of {REFLOW_LOSSES}, got {loss!r}")
    if not isinstance(label_dropout, (int, float)) or not 0 <= label_dropout <= 1:
        raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout!r}")
    if not isinstance(start_t, (int, float)) or not 0 <= start_t <= eps:
        raise ValueError(f"start_t must be in [0, eps = {eps}] (the path's start; training times are >= eps), "
                         f"got {start_t!r}")
    if not isinstance(end_t, (int, float)) or not eps < end_t <= 1:
        raise ValueError(f"end_t must be in (eps = {eps}, 1], got {end_t!r}")


class ReflowMethod(SingleNetworkMethod):
    """Reflow / k-step distillation of ``net`` on given couplings.

    Args:
        net: the rectified-flow velocity network (trainable).
        pairs: ``{"z0": (N, ...), "z1": (N, ...)[, "label": (N,)]}`` (e.g. from ``generate_pairs``).
        distill_steps: 0 = reflow (t uniform on [eps, 1]); k >= 1 = k-step distillation (t on the k-point grid).
        eps: the smallest training time (1e-3 as in the RF code).
        loss: one of :data:`REFLOW_LOSSES`.
        label_dropout: probability of the null label ``num_classes`` (0: the pairs' conditional coupling only).
        num_classes: defaults to ``net.num_classes`` (0 = unconditional; labels ignored).
        start_t: where the straight path starts (see :func:`reflow_loss`; 0 = the RF code's path).
        end_t: the largest training time (1 = data; < 1 for a teacher defined only down to a sigma_min > 0).
    """

    def __init__(
        self,
        net: nn.Module,
        pairs: Mapping[str, torch.Tensor],
        distill_steps: int = 0,
        eps: float = 1e-3,
        loss: str = "l2",
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        start_t: float = 0.0,
        end_t: float = 1.0,
    ) -> None:
        check_options(distill_steps, eps, loss, label_dropout, start_t, end_t)
        if "z0" not in pairs or "z1" not in pairs or pairs["z0"].shape != pairs["z1"].shape:
            raise ValueError("pairs must hold 'z0' and 'z1' of one shape")
        self.net = net
        self.pairs = {k: v for k, v in pairs.items()}
        self.num_pairs = int(pairs["z0"].shape[0])
        self.distill_steps, self.eps, self.loss = distill_steps, float(eps), loss
        self.start_t, self.end_t = float(start_t), float(end_t)
        self.label_dropout = float(label_dropout)
        self.num_classes = int(getattr(net, "num_classes", 0) if num_classes is None else num_classes)
        self.last_logs: dict[str, float] = {}

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training times on ``generator``'s device: U[eps, end_t] (reflow) or the k-point grid (distill)."""
        if self.distill_steps == 0:
            u = torch.rand(n, generator=generator, device=generator.device)
            return self.eps + (self.end_t - self.eps) * u
        k = self.distill_steps
        i = torch.randint(0, k, (n,), generator=generator, device=generator.device)
        return i.to(torch.float32) / k * (self.end_t - self.eps) + self.eps

    def step(
        self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> Mapping[str, torch.Tensor]:
        dev = batch["index"].device
        if self.pairs["z0"].device != dev:  # once: the pairs live where the batches do
            self.pairs = {k: v.to(dev) for k, v in self.pairs.items()}
        idx = batch["index"].long() % self.num_pairs
        z0, z1 = self.pairs["z0"][idx], self.pairs["z1"][idx]
        t = self.sample_t(z0.shape[0], generator).to(dev)
        self.last_logs = {}
        return {"main": reflow_loss(self.net, z0, z1, t, self.loss, self.start_t, **self.condition(idx, generator))}

    def condition(self, idx: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        """The network's condition keywords for pair rows ``idx``: ``class_labels`` (with label dropout)."""
        if not (self.num_classes and "label" in self.pairs):
            return {}
        labels = self.pairs["label"][idx]
        return {"class_labels": drop_labels(labels, self.label_dropout, self.num_classes, generator)}

    def sampling_denoiser(self, net: nn.Module | None = None) -> RectifiedFlowDenoiser:
        """The EDM-contract denoiser of ``net`` (e.g. the EMA copy) or the training net."""
        return RectifiedFlowDenoiser(net if net is not None else self.net)


# ------------------------------------------------------------------------------------------ config

_PAIR_KEYS = {"num_pairs": 20000, "pair_solver": "heun", "pair_steps": 32, "pair_schedule": "rf_uniform",
              "pair_sigma_max": RF_SIGMA_MAX, "pair_seed": 0, "pair_batch_size": 2048}


def _pairs_for(cfg: Any, spec: dict[str, Any], loaded: Any, denoiser: Any = None,
               condition: Any = None) -> dict[str, torch.Tensor]:
    """Load the cached pairs of this spec from the run folder, or generate and cache them.

    ``spec["pair_classes"]`` (the student's class count, or None) decides whether the coupling is
    class-conditional: an unconditional student needs the teacher's *unconditional* ODE map, since a
    conditional coupling is not a function of ``z0`` alone. ``denoiser`` (default ``loaded.denoiser``, e.g. a
    CFG-guided one) and ``condition`` (labels -> keywords) are passed to :func:`generate_pairs`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from fastgen.io.paths import atomic_write

    path = Path(cfg.output_dir) / PAIRS_FILE
    meta = {"spec": json.dumps(spec, sort_keys=True, default=str)}
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            same = (f.metadata() or {}).get("spec") == meta["spec"]
        if same:
            return load_file(str(path))
    pairs = generate_pairs(
        loaded.denoiser if denoiser is None else denoiser, spec["num_pairs"], tuple(loaded.shape),
        solver=spec["pair_solver"],
        steps=spec["pair_steps"], schedule=spec["pair_schedule"], sigma_max=spec["pair_sigma_max"],
        sigma_min=loaded.sigma_min, num_classes=spec["pair_classes"], condition=condition,
        seed=spec["pair_seed"], batch_size=spec["pair_batch_size"], progress=bool(cfg.progress),
    )
    with atomic_write(path) as f:
        f.write(save({k: v.contiguous() for k, v in pairs.items()}, metadata=meta))
    return pairs


def _teacher_net(loaded: Any, net: nn.Module, source: str) -> None:
    """Copy the teacher's rectified-flow velocity net into ``net`` (``init: teacher``)."""
    den = loaded.denoiser
    if not isinstance(den, RectifiedFlowDenoiser) or not isinstance(getattr(den, "net", None), nn.Module):
        raise ValueError(f"init: teacher needs a rectified-flow teacher (a flow or reflow model); {source!r} is "
                         f"a {type(den).__name__}; use init: scratch")
    try:
        net.load_state_dict(den.net.state_dict())
    except RuntimeError as err:
        raise ValueError(f"network does not fit the teacher {source!r}'s net (init: teacher): {err}") from err


def check_pair_spec(cfg: Any, spec: Mapping[str, Any], what: str = "reflow") -> None:
    """``ValueError`` naming the first invalid ``method.pair_*`` / ``num_pairs`` option, or a data section that
    is not ``{name: none, num_samples: num_pairs}`` (the method reads its pairs by index)."""
    for k in ("num_pairs", "pair_steps", "pair_seed", "pair_batch_size"):
        if not isinstance(spec[k], int) or isinstance(spec[k], bool) or spec[k] < (0 if k == "pair_seed" else 1):
            raise ValueError(f"method.{k} must be an int >= {0 if k == 'pair_seed' else 1}, got {spec[k]!r}")
    if spec["pair_schedule"] not in PAIR_SCHEDULES:
        raise ValueError(f"method.pair_schedule must be one of {PAIR_SCHEDULES}, got {spec['pair_schedule']!r}")
    if cfg.data.name != "none" or int(cfg.data.options.get("num_samples", -1)) != spec["num_pairs"]:
        raise ValueError(f"{what} reads its pairs by index: set data: {{name: none, num_samples: {spec['num_pairs']}}}"
                         f" (method.num_pairs); got data {cfg.data.name!r} {cfg.data.options}")


def from_config(cfg: Any) -> ReflowMethod:
    """Factory for ``method: {name: reflow, teacher, init, num_pairs, pair_solver, pair_steps, pair_schedule,
    pair_sigma_max, pair_seed, pair_batch_size, distill_steps, eps, loss, label_dropout, sample_shape}``."""
    from fastgen.models import load_model
    from fastgen.models.nets import build_network
    from fastgen.models.sources import source_files_key
    from fastgen.train.method import check_kwargs, method_kwargs

    kw = method_kwargs(cfg)
    source = kw.pop("teacher", None)
    if not isinstance(source, str) or not source:
        raise ValueError("method.teacher must name the model whose ODE gives the couplings (a load_model source, "
                         "e.g. digits-flow or a run folder)")
    init = kw.pop("init", "teacher")
    if init not in INITS:
        raise ValueError(f"method.init must be one of {INITS}, got {init!r}")
    spec = {k: kw.pop(k, d) for k, d in _PAIR_KEYS.items()}
    sample_shape = kw.pop("sample_shape", None)  # recorded for loaders of the run; must be the teacher's
    check_kwargs(ReflowMethod.__init__, {k: v for k, v in kw.items() if k != "pairs"}, "reflow method")
    if "pairs" in kw:
        raise ValueError("method.pairs is not a config option (the pairs come from method.teacher)")
    check_options(**{k: kw[k] for k in ("distill_steps", "eps", "loss", "label_dropout", "start_t", "end_t")
                     if k in kw})
    check_pair_spec(cfg, spec)
    loaded = load_model(source)
    if loaded.denoiser is None:
        raise ValueError(f"method.teacher {source!r} is a one-step student; reflow needs an ODE (a denoiser)")
    if sample_shape is not None and tuple(sample_shape) != tuple(loaded.shape):
        raise ValueError(f"method.sample_shape {list(sample_shape)} differs from the teacher's {list(loaded.shape)}")
    net_kw = dict(cfg.network)
    net = build_network(net_kw.pop("kind"), **net_kw)
    if init == "teacher":
        _teacher_net(loaded, net, source)
    classes = int(getattr(net, "num_classes", 0) or 0)
    if classes and (loaded.conditioning != "class" or loaded.num_classes != classes):
        raise ValueError(f"network.num_classes = {classes} needs a teacher with {classes} classes; {source!r} has "
                         f"conditioning {loaded.conditioning!r} ({loaded.num_classes} classes); use num_classes: 0")
    spec["pair_classes"] = classes or None
    # the identity fingerprints config + sigma range only: a retrained run folder keeps it, so its files key too
    spec["teacher"] = loaded.identity()
    spec["teacher_files"] = source_files_key(source)
    return ReflowMethod(net, _pairs_for(cfg, spec, loaded), **kw)


register_method("reflow", from_config)
