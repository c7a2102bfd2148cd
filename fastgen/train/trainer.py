"""The accelerate trainer: runs any :class:`~fastgen.train.method.Method` on CPU or GPU, 1 or N processes.

What the trainer owns (the method owns networks and losses, see :mod:`fastgen.train.method`):

- **Devices and processes** through ``accelerate.Accelerator`` (``accelerate launch --num_processes N``,
  ``--cpu`` for gloo). Gradients are averaged across processes with one all-reduce per optimizer step
  (mathematically DDP; the method keeps calling its own un-wrapped modules, so methods with several
  losses and networks need no DDP plumbing). FSDP sharding is not supported.
- **Batches:** ``cfg.batch_size`` rows per optimizer step (global), drawn without replacement from an
  epoch permutation seeded by ``(seed, epoch)``; the data position is ``step * batch_size`` rows. The global
  batch is split into ``micro_batches`` contiguous shards (default one per process) that the processes
  share round-robin-free (process p runs shards ``p*A .. p*A+A-1`` with ``A`` accumulation steps).
- **Randomness:** shard ``i`` of step ``s`` gets a CPU ``torch.Generator`` seeded from ``(seed, s, i)``
  (passed to ``method.step``) and the global torch seed is set from the same triple, so neither the
  process count nor a resume changes any random number.
- **Optimisation:** AdamW per optimizer group, linear lr warm-up, global-norm gradient clipping,
  mixed precision (``bf16`` autocast), EMA (:mod:`fastgen.train.ema`) of ``method.ema_networks()``.
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

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.io import checkpoint as ckpt
from fastgen.train.batches import build_dataset, global_indices, shard_seed
from fastgen.train.config import TrainConfig, save_config
from fastgen.train.ema import make_ema
from fastgen.train.health import DEFAULT_EXPLODE_BOUND, TrainingDiverged, validate_optim
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
        # autocast is applied by the trainer itself (torch.autocast), so Accelerators with different
        # precisions can coexist in one process (accelerate's state is a process-wide singleton)
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
            o = self._optim_settings(oname)
            self.opt_params[oname] = params
            self.optimizers[oname] = torch.optim.AdamW(
                params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"]
            )
        self._sigma_seen: list[float] = []
        self._record_sigmas()
        unknown_groups = sorted(set(cfg.optim.groups) - set(groups))
        if unknown_groups:
            raise ValueError(f"optim.groups names unknown optimizers {unknown_groups}; have {sorted(groups)}")
        self.ema = {
            n: make_ema(nets[n], cfg.ema.decay, cfg.ema.warmup) for n in self.method.ema_networks()
        }
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

    # ------------------------------------------------------------------------------------------
    def _optim_settings(self, name: str) -> dict[str, Any]:
        o = self.cfg.optim
        base = {"lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay,
                "warmup_steps": o.warmup_steps, "grad_clip": o.grad_clip, "decay_start": o.decay_start,
                "decay_end": o.decay_end, "final_lr_ratio": o.final_lr_ratio,
                "explode_bound": getattr(o, "explode_bound", DEFAULT_EXPLODE_BOUND)}
        over = dict(o.groups.get(name, {}))
        unknown = sorted(set(over) - set(base))
        if unknown:
            raise ValueError(f"optim.groups.{name}: unknown key(s) {unknown}; accepted: {sorted(base)}")
        base.update(over)
        validate_optim(name, base)
        return base

    def lr_at(self, name: str, step: int) -> float:
        """Learning rate of optimizer ``name`` at (0-based) step ``step``: linear warm-up, constant, then
        an optional linear decay between ``decay_start`` and ``decay_end``."""
        o = self._optim_settings(name)
        w = int(o["warmup_steps"])
        lr = float(o["lr"]) * (min(1.0, (step + 1) / w) if w > 0 else 1.0)
        a, b = o["decay_start"], o["decay_end"]
        if a is not None and b is not None and step > a:
            frac = min(1.0, (step - a) / (b - a))
            lr *= 1.0 - frac * (1.0 - float(o["final_lr_ratio"]))
        return lr

    # ------------------------------------------------------------------------------------------
    # ------------------------------------------------------------------------------------------
    def _all_params(self) -> list[nn.Parameter]:
        return [p for m in self.networks.values() for p in m.parameters()]

    def _reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        return flat

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

    def _forward_backward(self, step: int, rows: torch.Tensor, params: list[nn.Parameter]):
        """Run this process's micro-batches: per-loss gradients summed into a stash (not yet averaged)."""
        cfg = self.cfg
        shard_size = cfg.batch_size // self.micro
        stash: dict[str, list[torch.Tensor | None]] = {}
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
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
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
                for p in params:
                    p.grad = None
                loss_sum[name] = loss_sum.get(name, 0.0) + loss.detach().float()
                if torch.isfinite(loss) and loss.requires_grad:
                    # losses may share one forward pass: keep the graph for the later ones
                    loss.backward(retain_graph=li < len(items) - 1)
                grads = stash.setdefault(name, [None] * len(self.opt_params[name]))
                for i, p in enumerate(self.opt_params[name]):
                    if p.grad is not None:
                        grads[i] = p.grad.detach().clone() if grads[i] is None else grads[i] + p.grad
        for p in params:
            p.grad = None
        return order, loss_sum, stash, extra

    def _averaged_grads(self, name: str, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The gradients of optimizer ``name`` averaged over all micro-batches of all processes."""
        ps = self.opt_params[name]
        if self.world == 1:
            return [None if g is None else g / self.micro for g in grads]
        mask = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=self.device)
        self._reduce_sum(mask)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, ps)])
        self._reduce_sum(flat)
        out: list[torch.Tensor | None] = []
        off = 0
        for i, p in enumerate(ps):
            n = p.numel()
            out.append(flat[off : off + n].view_as(p) / self.micro if mask[i] > 0 else None)
            off += n
        return out

    def _check_health(self, step: int, names: list[str], lvec: torch.Tensor, norms: dict[str, float]) -> None:
        """Stop (before any weight changes) on a non-finite loss or gradient or one beyond ``explode_bound``."""
        for i, n in enumerate(names):
            v = float(lvec[i])
            if not math.isfinite(v):
                raise self._diverged(f"loss {n!r} is {v}", step)
        for n, gn in norms.items():
            if not math.isfinite(gn):
                raise self._diverged(f"the gradient of loss {n!r} is non-finite (norm {gn})", step)
        for i, n in enumerate(names):
            bound = self._optim_settings(n)["explode_bound"]
            if bound is None:
                continue
            v = float(lvec[i])
            if abs(v) > bound:
                raise self._diverged(f"the run exploded: |loss {n!r}| = {v:.4g} > optim.explode_bound {bound:g}", step)
            if norms[n] > bound:
                raise self._diverged(
                    f"the run exploded: grad norm of loss {n!r} = {norms[n]:.4g} > optim.explode_bound {bound:g}",
                    step,
                )

    def train_step(self) -> dict[str, float]:
        """One optimizer step (all micro-batches of this process); returns the logged scalars.

        Nothing changes (weights, optimizer state, EMA) when a loss or gradient is non-finite or
        beyond ``optim.explode_bound``: :class:`TrainingDiverged` is raised instead.
        """
        cfg, step = self.cfg, self.step
        self._sigma_seen = []
        rows = global_indices(self.n_data, cfg.seed, step, cfg.batch_size)
        names, loss_sum, stash, extra = self._forward_backward(step, rows, self._all_params())
        lvec = self._reduce_sum(torch.stack([loss_sum[n] for n in names]).to(self.device)) / self.micro
        logs = {f"loss/{n}": float(lvec[i]) for i, n in enumerate(names)}
        avg = {n: self._averaged_grads(n, stash[n]) for n in names}
        norms = {}
        for n in names:
            gs = [g for g in avg[n] if g is not None]
            norms[n] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in gs])))\
                if gs else 0.0
        self._check_health(step, names, lvec, norms)
        end_step = getattr(self.method, "end_step", None)
        if callable(end_step):  # cross-shard method state (f-distill's ratio bins), once per step
            end_step()
        for name in names:
            ps = self.opt_params[name]
            o = self._optim_settings(name)
            for g, p in zip(avg[name], ps):
                p.grad = g
            if o["grad_clip"] is not None:
                # the pre-clip norm is already known from the health check: clip with it, don't recompute it
                torch.nn.utils.clip_grads_with_norm_([p for p in ps if p.grad is not None], float(o["grad_clip"]),
                                                     torch.tensor(norms[name]))
                logs[f"grad_norm/{name}"] = norms[name]
            lr = self.lr_at(name, step)
            for g in self.optimizers[name].param_groups:
                g["lr"] = lr
            logs[f"lr/{name}"] = lr
            self.optimizers[name].step()
            for p in ps:
                p.grad = None
        if (step + 1) % cfg.ema.every == 0:
            for n, e in self.ema.items():
                e.update_parameters(self.networks[n])
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
