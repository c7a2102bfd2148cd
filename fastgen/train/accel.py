"""How the trainer hands a method's networks to ``accelerate``: prepared (DDP/FSDP-wrapped) networks bound
into the method while it computes its losses, mixed precision, loss scaling and gradient checkpointing.

- :class:`NetworkSlots` finds every place a method keeps a reference to one of its networks (an attribute
  of the method, or a child of a module the method holds, e.g. ``EDMDenoiser.net``) and, inside
  :meth:`NetworkSlots.bound`, points those references at the prepared networks, so the method's forward
  passes run through DDP (which is what makes DDP synchronise gradients) while the method itself never
  sees a wrapper outside a step (sampling, EMA, checkpoints and exports use the plain modules).
- :func:`autocast` / :func:`make_scaler`: ``mixed_precision`` ``no | fp16 | bf16`` (accelerate's names).
  fp16 scales losses with accelerate's GradScaler (``accelerator.scaler`` when the accelerator was built
  with fp16, else :func:`accelerate.utils.get_grad_scaler`, which also serves CPU).
- :func:`enable_gradient_checkpointing`: calls ``enable_gradient_checkpointing()`` on every Diffusers
  model inside a network and on fastgen's own nets (which run their blocks under
  ``torch.utils.checkpoint``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["PRECISIONS", "FROZEN_SHARDING", "NetworkSlots", "autocast", "make_scaler",
           "enable_gradient_checkpointing", "grad_norm", "full_tensor"]

PRECISIONS = ("no", "fp16", "bf16")
FROZEN_SHARDING = ("replicate", "shard")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``fp16``/``bf16`` on ``device``; a null context for ``no``."""
    if precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def make_scaler(accelerator: Any, precision: str) -> Any | None:
    """The loss scaler for ``fp16`` (None otherwise): the accelerator's own GradScaler when it made one
    (an accelerator built with ``mixed_precision="fp16"`` on a GPU), else accelerate's ``get_grad_scaler``
    for the accelerator's distributed type (a ``torch.amp.GradScaler`` on the accelerator's device), with
    the accelerator's ``GradScalerKwargs`` (``init_scale``, ``growth_interval``, ...) when it has them."""
    if precision != "fp16":
        return None
    if getattr(accelerator, "scaler", None) is not None:
        return accelerator.scaler
    from accelerate.utils import get_grad_scaler

    handler = getattr(accelerator, "scaler_handler", None)
    kwargs = handler.to_kwargs() if handler is not None else {}
    if accelerator.device.type == "cpu":
        return torch.amp.GradScaler("cpu", **kwargs)
    if is_fsdp(accelerator):  # FSDP2 (the trainer's only FSDP) uses the plain scaler, as accelerate does
        from accelerate.utils import get_fsdp2_grad_scaler

        return get_fsdp2_grad_scaler(device=accelerator.device.type, **kwargs)
    return get_grad_scaler(accelerator.distributed_type, **kwargs)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the gathered full tensor of an FSDP2 ``DTensor`` (a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor | None:
    """The global 2-norm (a 0-d tensor; a DTensor under FSDP2) of the gradients of ``params``, None if
    none has a gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.get_total_norm(grads, 2.0)


class NetworkSlots:
    """The references a method holds to its networks, to swap for the prepared ones during a step.

    Args:
        method: the method object.
        pairs: ``{name: (plain_module, prepared_module)}``; names whose prepared module is the plain one
            (one process, no FSDP) need no slot.

    Raises ``ValueError`` when a network with a distinct prepared module is referenced nowhere the
    search looks (attributes of the method, items of dicts/lists among them, and the children of the
    modules found there): its forward passes would bypass DDP and its gradients would not be averaged.
    """

    def __init__(self, method: Any, pairs: Mapping[str, tuple[nn.Module, nn.Module]]) -> None:
        swap = {id(plain): prepared for plain, prepared in pairs.values() if prepared is not plain}
        #: (set(value), plain, prepared) for every reference found
        self.slots: list[tuple[Callable[[nn.Module], None], nn.Module, nn.Module]] = []
        if not swap:
            return
        plains = {id(plain) for plain, _ in pairs.values()}
        seen: set[int] = set()

        def visit(v: Any, setter: Callable[[nn.Module], None]) -> None:
            if not isinstance(v, nn.Module):
                return
            if id(v) in swap:
                self.slots.append((setter, v, swap[id(v)]))
                return
            if id(v) in seen or id(v) in plains:
                return
            seen.add(id(v))
            for key, child in list(v._modules.items()):
                visit(child, functools.partial(v._modules.__setitem__, key))

        for attr, v in list(vars(method).items()):
            visit(v, functools.partial(setattr, method, attr))
            if isinstance(v, (dict, list)):
                for k, item in (v.items() if isinstance(v, dict) else enumerate(v)):
                    visit(item, functools.partial(v.__setitem__, k))
        found = {id(plain) for _, plain, _ in self.slots}
        missing = [n for n, (plain, prepared) in pairs.items() if prepared is not plain and id(plain) not in found]
        if missing:
            raise ValueError(
                f"the method's networks {missing} are not held as attributes of the method (or children of "
                "modules it holds), so the trainer cannot run them through their prepared (DDP/FSDP) wrappers"
            )

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """Inside the block every slot holds the prepared network; the plain ones are restored after."""
        for setter, _plain, prepared in self.slots:
            setter(prepared)
        try:
            yield
        finally:
            for setter, plain, _prepared in self.slots:
                setter(plain)


def enable_gradient_checkpointing(name: str, net: nn.Module) -> int:
    """Turn on gradient checkpointing in every sub-model of network ``name`` that supports it (Diffusers
    models with ``_supports_gradient_checkpointing``, fastgen nets with ``enable_gradient_checkpointing``);
    returns how many. ``ValueError`` when none does."""
    n = 0
    for m in net.modules():
        fn = getattr(m, "enable_gradient_checkpointing", None)
        if not callable(fn) or getattr(m, "_supports_gradient_checkpointing", True) is False:
            continue
        fn()
        n += 1
    if n == 0:
        raise ValueError(
            f"gradient_checkpointing: network {name!r} ({type(net).__name__}) contains no model that supports "
            "it (Diffusers models and fastgen's mlp/unet nets do)"
        )
    return n


def is_fsdp(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards with FSDP (its accelerate config or plugin selected it)."""
    return str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")


class OptimizerGroup:
    """Several optimizers stepped as one named optimizer (FSDP: accelerate prepares one network per
    optimizer, so a group over several networks gets one AdamW per network; AdamW is per parameter, so
    the step is the same as one AdamW over all of them)."""

    def __init__(self, optimizers: list[Any]) -> None:
        self.members = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.members for g in o.param_groups]

    def step(self) -> None:
        for o in self.members:
            o.step()


def raw_optimizers(opt: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind a prepared optimizer or an :class:`OptimizerGroup`."""
    members = opt.members if isinstance(opt, OptimizerGroup) else [opt]
    return [getattr(o, "optimizer", o) for o in members]


def prepare_fsdp(
    accelerator: Any, nets: Mapping[str, nn.Module], groups: Mapping[str, list[str]],
    make_optimizer: Callable[[str, list[nn.Parameter]], torch.optim.Optimizer],
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """FSDP2 preparation: each network with an optimizer over its own parameters
    (``accelerator.prepare(net, opt)``: accelerate's FSDP2 shards one model per call and swaps that
    optimizer's parameters for the shards). Returns the prepared networks and, per optimizer name, the
    prepared optimizer or an :class:`OptimizerGroup` of them."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if getattr(plugin, "fsdp_version", 2) != 2:
        raise ValueError("FSDP: fastgen's trainer supports FSDP2 only; set fsdp_version: 2 in the accelerate config")
    prepared: dict[str, nn.Module] = {}
    optimizers: dict[str, Any] = {}
    for oname, names in groups.items():
        members = []
        for n in names:
            params = [p for p in nets[n].parameters() if p.requires_grad]
            prepared[n], opt = accelerator.prepare(nets[n], make_optimizer(oname, params))
            members.append(opt)
        optimizers[oname] = members[0] if len(members) == 1 else OptimizerGroup(members)
    for n, net in nets.items():  # trainable networks no optimizer names
        if n not in prepared:
            prepared[n] = accelerator.prepare(net)
    return prepared, optimizers


class FullView:
    """What :meth:`AveragedModel.update_parameters` reads (``parameters()``, ``buffers()``) of an FSDP2
    network, gathered to full tensors, so the (unsharded) EMA copy averages the whole network."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def parameters(self) -> list[torch.Tensor]:
        return [full_tensor(p.detach()) for p in self.module.parameters()]

    def buffers(self) -> list[torch.Tensor]:
        return [full_tensor(b) for b in self.module.buffers()]
