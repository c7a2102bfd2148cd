"""The accelerate trainer: runs any :class:`~fastgen.train.method.Method` on CPU or GPU, 1 or N processes.

What the trainer owns (the method owns networks and losses, see :mod:`fastgen.train.method`):

- **Devices and processes** through ``accelerate.Accelerator``, as its authors intend: every trainable
  network goes through ``accelerator.prepare`` together with its optimizer (DDP when several processes
  run; FSDP when the accelerate config selects it, see docs/training.md), and the method's forward passes
  run through the prepared networks (:class:`~fastgen.train.accel.NetworkSlots`), so DDP averages the
  gradients. Frozen networks (teachers) are replicated on every device, or sharded by FSDP with
  ``frozen_sharding: shard``.
- **Batches:** ``cfg.batch_size`` rows per optimizer step (global), drawn without replacement from an
  epoch permutation seeded by ``(seed, epoch)``; the data position is ``step * batch_size`` rows. The global
  batch is split into ``micro_batches`` contiguous shards (default one per process) that the processes
  share round-robin-free (process p runs shards ``p*A .. p*A+A-1`` with ``A`` accumulation steps).
- **Randomness:** shard ``i`` of step ``s`` gets a CPU ``torch.Generator`` seeded from ``(seed, s, i)``
  (passed to ``method.step``) and the global torch seed is set from the same triple, so neither the
  process count nor a resume changes any random number.
- **Optimisation:** AdamW per optimizer group, linear lr warm-up, global-norm gradient clipping,
  mixed precision (``mixed_precision: fp16`` with loss scaling, or ``bf16``; autocast around
  ``method.step``), optional gradient checkpointing, EMA (:mod:`fastgen.train.ema`) of the plain
  (unwrapped) ``method.ema_networks()``. Each loss is backpropagated into its own optimizer's
  parameters only (``backward(inputs=...)``), divided by the number of this process's micro-batches;
  DDP's average over processes then gives the mean over all ``micro_batches`` shards.
- **Safety:** a non-finite loss or gradient, or a loss / pre-clip gradient norm beyond
  ``optim.explode_bound`` (default 1e8), stops the run *before* the optimizer step with
  :class:`TrainingDiverged` naming the step, the loss and the step's sigma range and the last good
  checkpoint (checkpoints are verified finite before they are written). Invalid optimizer settings
  (negative or non-finite ``lr``, ``grad_clip`` ...) are refused when the trainer is built. Temporary
  folders of interrupted checkpoint writes are removed at start-up.
- **Records:** atomic checkpoints (:mod:`fastgen.io.checkpoint`) every ``checkpoint_every`` steps and
  at the end, exact resume, a tqdm bar and a JSONL metrics log ``<output_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.io import checkpoint as ckpt
from fastgen.train.accel import (
    FullView,
    NetworkSlots,
    autocast,
    enable_gradient_checkpointing,
    full_tensor,
    grad_norm,
    is_fsdp,
    make_scaler,
    prepare_fsdp,
    raw_optimizers,
)
from fastgen.train.batches import build_dataset, global_indices, shard_seed
from fastgen.train.config import TrainConfig, save_config
from fastgen.train.ema import make_ema
from fastgen.train.health import DEFAULT_EXPLODE_BOUND, TrainingDiverged, optim_settings, scheduled_lr, unhealthy
from fastgen.train.method import Method, build_method
from fastgen.train.trainer_state import CheckpointMixin

__all__ = ["Trainer", "TrainingDiverged", "build_dataset", "shard_seed", "DEFAULT_EXPLODE_BOUND"]

class Trainer(CheckpointMixin):
    """Train ``method`` (or the method ``cfg.method`` names) as configured by ``cfg``.

    Args:
        cfg: the run configuration (:class:`~fastgen.train.config.TrainConfig`).
        method: a ready method; default ``build_method(cfg)``.
        dataset: dict of equal-length tensors (rows are sampled from it); default ``build_dataset(cfg)``.
        accelerator: an ``accelerate.Accelerator``; default one built from ``cfg`` (``cpu``, mixed precision).

    ``train()`` runs to ``cfg.steps`` (resuming per ``cfg.resume``) and returns the list of logged records.
    After training, ``trainer.ema[name].module`` is the EMA network and ``trainer.method`` the method.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        method: Method | None = None,
        dataset: Mapping[str, torch.Tensor] | None = None,
        accelerator: Any | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(int(cfg.num_threads))
        # autocast and the fp16 loss scaler are applied by the trainer (accel.autocast / make_scaler), so
        # trainers of different precisions coexist in one process (accelerate's state is a process-wide
        # singleton); an accelerator built with a precision must agree with the config (see _prepare)
        self.acc = accelerator or Accelerator(cpu=cfg.cpu)
        self.device = self.acc.device
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        micro = cfg.micro_batches or self.world
        if micro % self.world:
            raise ValueError(
                f"micro_batches ({micro}) must be a multiple of the number of processes ({self.world})"
            )
        if cfg.batch_size % micro:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by micro_batches ({micro})")
        self.micro = micro
        self.accum = micro // self.world
        set_seed(cfg.seed)  # network initialisation is identical on every process
        self.method = method if method is not None else build_method(cfg)
        data = dict(dataset) if dataset is not None else build_dataset(cfg)
        if not data:
            raise ValueError("dataset must contain at least one tensor")
        lengths = {k: int(v.shape[0]) for k, v in data.items()}
        if len(set(lengths.values())) != 1 or min(lengths.values()) < 1:
            raise ValueError(f"dataset tensors must be non-empty with equal lengths, got {lengths}")
        self.n_data = next(iter(lengths.values()))
        self.data = {k: v.to(self.device) for k, v in data.items()}

        nets = dict(self.method.networks())
        for m in nets.values():
            m.to(self.device).train()
        for m in self.method.frozen().values():
            m.to(self.device).eval().requires_grad_(False)
        self.networks = nets
        groups = dict(self.method.optimizer_groups())
        self.opt_params: dict[str, list[nn.Parameter]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for oname, net_names in groups.items():
            missing = [n for n in net_names if n not in nets]
            if missing:
                raise ValueError(
                    f"optimizer group {oname!r} names unknown networks {missing}; have {list(nets)}"
                )
            params = [p for n in net_names for p in nets[n].parameters() if p.requires_grad]
            self.opt_params[oname] = params
            self.optimizers[oname] = self._adamw(oname, params)
        self._sigma_seen: list[float] = []
        self._record_sigmas()
        unknown_groups = sorted(set(cfg.optim.groups) - set(groups))
        if unknown_groups:
            raise ValueError(f"optim.groups names unknown optimizers {unknown_groups}; have {sorted(groups)}")
        if cfg.gradient_checkpointing:
            for n, m in nets.items():
                enable_gradient_checkpointing(n, m)
        self.ema = {
            n: make_ema(nets[n], cfg.ema.decay, cfg.ema.warmup) for n in self.method.ema_networks()
        }
        self._groups = groups
        self._prepare(nets)
        self.step = 0
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.last_checkpoint: Path | None = None
        self.log_path = self.out / "metrics.jsonl"

    def _record_sigmas(self) -> None:
        """Wrap ``method.sample_sigma`` (when it has one) to remember each step's sigma range for reports."""
        fn = getattr(self.method, "sample_sigma", None)
        if not callable(fn):
            return

        def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = fn(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.numel():
                self._sigma_seen += [float(out.min()), float(out.max())]
            return out

        try:
            self.method.sample_sigma = recorded
        except AttributeError:  # a method that forbids attributes: reports go without the sigma range
            pass

    def _adamw(self, name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        o = self._optim_settings(name)
        return torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                 weight_decay=o["weight_decay"])

    def _prepare(self, nets: dict[str, nn.Module]) -> None:
        """Every trainable network with its optimizer through ``accelerator.prepare``; frozen networks
        replicated or (``frozen_sharding: shard``, FSDP only) prepared for sharding; the loss scaler."""
        acc, cfg = self.acc, self.cfg
        own = getattr(acc, "mixed_precision", "no")
        if own != "no" and own != cfg.mixed_precision:
            raise ValueError(
                f"mixed_precision: the config says {cfg.mixed_precision!r} but the accelerator was built with "
                f"{own!r} (accelerate config or --mixed_precision); set them to the same value"
            )
        self.fsdp = is_fsdp(acc)
        if cfg.frozen_sharding == "shard" and not self.fsdp:
            raise ValueError("frozen_sharding: 'shard' needs FSDP (launch with an FSDP accelerate config); "
                             "use 'replicate' otherwise")
        names, onames = list(nets), list(self.optimizers)
        if self.fsdp and not getattr(self.method, "fsdp_supported", True):
            raise ValueError(f"method {type(self.method).__name__} does not support FSDP (see its fsdp_supported "
                             "note); launch it without an FSDP accelerate config (DDP)")
        if self.fsdp:
            self.prepared, self.optimizers = prepare_fsdp(acc, nets, self._groups, self._adamw)
        else:
            prepared = acc.prepare(*[nets[n] for n in names], *[self.optimizers[o] for o in onames])
            prepared = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
            self.prepared = dict(zip(names, prepared[: len(names)]))
            self.optimizers = dict(zip(onames, prepared[len(names):]))
        self.networks = {n: acc.unwrap_model(m) for n, m in self.prepared.items()}
        # FSDP swaps the optimizers' parameters for sharded ones: read them back
        self.opt_params = {o: [p for g in opt.param_groups for p in g["params"]] for o, opt in self.optimizers.items()}
        pairs = {n: (self.networks[n], self.prepared[n]) for n in names}
        if cfg.frozen_sharding == "shard":  # accelerate shards a model without an optimizer when asked to
            pairs.update({f"frozen:{n}": (m, acc.prepare(m)) for n, m in self.method.frozen().items()})
        self._slots = NetworkSlots(self.method, pairs)
        self.scaler = make_scaler(acc, cfg.mixed_precision)

    # ------------------------------------------------------------------------------------------
    def _optim_settings(self, name: str) -> dict[str, Any]:
        return optim_settings(self.cfg.optim, name)

    def lr_at(self, name: str, step: int) -> float:
        """Learning rate of optimizer ``name`` at (0-based) ``step`` (see ``health.scheduled_lr``)."""
        return scheduled_lr(self._optim_settings(name), step)

    # ------------------------------------------------------------------------------------------
    def _all_params(self) -> list[nn.Parameter]:
        """Every parameter of every trainable network (listed once, after ``prepare``)."""
        if getattr(self, "_params", None) is None:
            self._params = [p for m in self.networks.values() for p in m.parameters()]
        return self._params

    def _diverged(self, what: str, step: int) -> TrainingDiverged:
        where = str(self.last_checkpoint) if self.last_checkpoint else "none (none written yet)"
        sig = ""
        if self._sigma_seen:
            sig = f" (sigma in [{min(self._sigma_seen):.4g}, {max(self._sigma_seen):.4g}] this step)"
        return TrainingDiverged(
            f"{what} at step {step}{sig}; the run stopped before updating the weights; "
            f"last good checkpoint: {where}",
            step,
            self.last_checkpoint,
        )

    def _forward_backward(self, step: int, rows: torch.Tensor):
        """Run this process's micro-batches; each loss is backpropagated (scaled by ``1 / accum``, and by
        the fp16 loss scale) into its optimizer's parameters, DDP synchronising on the last micro-batch."""
        cfg = self.cfg
        shard_size = cfg.batch_size // self.micro
        loss_sum: dict[str, torch.Tensor] = {}
        extra: dict[str, float] = {}
        order: list[str] = []
        for j in range(self.accum):
            shard = self.rank * self.accum + j
            idx = rows[shard * shard_size : (shard + 1) * shard_size].to(self.device)
            batch = {k: v[idx] for k, v in self.data.items()}
            seed = shard_seed(cfg.seed, step, shard)
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            with contextlib.ExitStack() as stack:
                if j < self.accum - 1:  # accumulate locally; the last micro-batch's backward syncs
                    for m in self.prepared.values():
                        stack.enter_context(self.acc.no_sync(m))
                with self._slots.bound(), autocast(self.device, cfg.mixed_precision):
                    losses = self.method.step(batch, step, gen)
                if not losses:
                    raise ValueError(f"method.step returned no losses at step {step}")
                for name in losses:
                    if name not in self.optimizers:
                        raise ValueError(
                            f"method.step returned loss {name!r}; optimizers are {list(self.optimizers)}"
                        )
                    if name not in order:
                        order.append(name)
                for k, v in getattr(self.method, "last_logs", {}).items():
                    extra[k] = extra.get(k, 0.0) + float(v) / self.accum
                items = list(losses.items())
                for li, (name, loss) in enumerate(items):
                    loss_sum[name] = loss_sum.get(name, 0.0) + loss.detach().float()
                    if not loss.requires_grad:
                        continue
                    if self.accum > 1:
                        loss = loss / self.accum
                    if self.scaler is not None:
                        loss = self.scaler.scale(loss)
                    # losses may share one forward pass: keep the graph for the later ones
                    self._backward(name, loss, retain_graph=li < len(items) - 1)
        return order, loss_sum, extra

    def _backward(self, name: str, loss: torch.Tensor, retain_graph: bool) -> None:
        """Backpropagate ``loss`` into optimizer ``name``'s parameters only. FSDP2's graph leaves are the
        unsharded parameters, so there the other optimizers' gradients are set aside and restored."""
        if not self.fsdp:
            loss.backward(inputs=self.opt_params[name], retain_graph=retain_graph)
            return
        others = [p for o, ps in self.opt_params.items() if o != name for p in ps]
        kept = [p.grad for p in others]
        for p in others:
            p.grad = None
        loss.backward(retain_graph=retain_graph)
        for p, g in zip(others, kept):
            p.grad = g

    def _check_health(self, step: int, names: list[str], lvec: torch.Tensor, norms: dict[str, float]) -> None:
        """Stop (before any weight changes) on a non-finite loss or gradient or one beyond ``explode_bound``."""
        losses = {n: float(lvec[i]) for i, n in enumerate(names)}
        why = unhealthy(losses, norms, {n: self._optim_settings(n)["explode_bound"] for n in names})
        if why is not None:
            raise self._diverged(why, step)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (all micro-batches of this process); returns the logged scalars.

        Nothing changes (weights, optimizer state, EMA) when a loss or gradient is non-finite or
        beyond ``optim.explode_bound``: :class:`TrainingDiverged` is raised instead. Under fp16 a
        non-finite gradient is an overflow of the loss scale: the step is skipped and the scale lowered
        (``skipped`` in the logs); it is a divergence only once the scale has fallen below 1.
        """
        cfg, step = self.cfg, self.step
        self._sigma_seen = []
        rows = global_indices(self.n_data, cfg.seed, step, cfg.batch_size)
        for p in self._all_params():
            p.grad = None
        names, loss_sum, extra = self._forward_backward(step, rows)
        lvec = self.acc.reduce(torch.stack([loss_sum[n] for n in names]).to(self.device), "sum") / self.micro
        logs = {f"loss/{n}": float(lvec[i]) for i, n in enumerate(names)}
        if self.scaler is not None:
            for n in names:
                for raw in raw_optimizers(self.optimizers[n]):
                    self.scaler.unscale_(raw)
        totals = {n: grad_norm(self.opt_params[n]) for n in names}
        norms = {n: 0.0 if t is None else float(full_tensor(t)) for n, t in totals.items()}
        overflow = self.scaler is not None and not all(math.isfinite(v) for v in norms.values())
        if overflow and self.scaler.get_scale() < 1.0:
            overflow = False  # the scale cannot help any more: report the non-finite gradient
        self._check_health(step, names, lvec, {n: (0.0 if overflow else v) for n, v in norms.items()})
        end_step = getattr(self.method, "end_step", None)
        if callable(end_step):  # cross-shard method state (f-distill's ratio bins), once per step
            end_step()
        for name in names:
            ps = self.opt_params[name]
            o = self._optim_settings(name)
            if o["grad_clip"] is not None and not overflow:
                # the pre-clip norm is already known from the health check: clip with it, don't recompute it
                torch.nn.utils.clip_grads_with_norm_([p for p in ps if p.grad is not None], float(o["grad_clip"]),
                                                     totals[name] if totals[name] is not None else torch.tensor(0.0))
                logs[f"grad_norm/{name}"] = norms[name]
            lr = self.lr_at(name, step)
            opt = self.optimizers[name]
            for g in opt.param_groups:
                g["lr"] = lr
            logs[f"lr/{name}"] = lr
            if self.scaler is not None:
                for raw in raw_optimizers(opt):
                    self.scaler.step(raw)  # skipped on overflow
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()  # once per step, after every optimizer (accelerate's per-optimizer update
            logs["loss_scale"] = float(self.scaler.get_scale())  # would re-unscale the later ones)
            logs["skipped"] = float(overflow)
        for p in self._all_params():
            p.grad = None
        if (step + 1) % cfg.ema.every == 0:
            for n, e in self.ema.items():
                e.update_parameters(FullView(self.networks[n]) if self.fsdp else self.networks[n])
        logs.update(extra)
        self.step = step + 1
        return logs

    def _truncate_log(self) -> None:
        if not (self.acc.is_main_process and self.log_path.is_file()):
            return
        keep = []
        for line in self.log_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        self.log_path.write_text("".join(k + "\n" for k in keep))

    def train(self, callback: Callable[[Trainer, dict[str, float]], None] | None = None) -> list[dict]:
        """Run (or resume) to ``cfg.steps``. ``callback(trainer, logs)`` runs after every step."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            ckpt.remove_stale_temporaries(self.ckpt_root)
        self.acc.wait_for_everyone()
        self._maybe_resume()
        self._truncate_log()
        records: list[dict] = []
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.acc.is_main_process),
            desc=cfg.name, dynamic_ncols=True,
        )
        t0, s0 = time.perf_counter(), self.step
        try:
            while self.step < cfg.steps:
                logs = self.train_step()
                bar.update(1)
                if callback is not None:
                    callback(self, logs)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = time.perf_counter() - t0
                    rec = {"step": self.step, **logs,
                           "samples_per_s": (self.step - s0) * cfg.batch_size / max(dt, 1e-9),
                           "wall_s": dt, "world_size": self.world}
                    records.append(rec)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
                    if self.acc.is_main_process:
                        with open(self.log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        return records

    def ema_network(self, name: str = "net") -> nn.Module:
        """The EMA copy of network ``name`` (the raw network if it has no EMA)."""
        return self.ema[name].module if name in self.ema else self.networks[name]
