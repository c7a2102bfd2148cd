"""The trainer's checkpoint side: every tensor of the training state under checkpoint names, atomic
writes (verified finite first), exact restore and resume. Mixed into :class:`fastgen.train.trainer.Trainer`."""

from __future__ import annotations

from pathlib import Path

import torch

from fastgen.io import checkpoint as ckpt
from fastgen.train.accel import full_tensor
from fastgen.train.config import config_to_dict

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """Needs ``networks``, ``ema``, ``method``, ``optimizers``, ``acc``, ``cfg``, ``step``, ``n_data``,
    ``device``, ``ckpt_root``, ``last_checkpoint`` and ``_diverged`` from the trainer."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the training state under checkpoint names."""
        t: dict[str, torch.Tensor] = {}
        for n, m in self.networks.items():  # FSDP2: shards gathered to full tensors (on every process)
            t.update({f"net/{n}.{k}": full_tensor(v) for k, v in m.state_dict().items()})
        for n, e in self.ema.items():
            t.update({f"ema/{n}.{k}": v for k, v in e.state_dict().items()})
        for k, v in self.method.state_dict().items():
            t[f"method/{k}"] = v
        return t

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (main process only); returns its directory."""
        path = None
        tensors = self.state_tensors()  # on every process: under FSDP gathering is a collective
        bad = ckpt.tensors_finite(tensors)
        if bad:  # never write (or name) a non-finite checkpoint as a good one
            raise self._diverged(f"{len(bad)} state tensor(s) are non-finite (e.g. {bad[0]!r})", self.step)
        if self.acc.is_main_process:
            optim_meta = {}
            for name, opt in self.optimizers.items():
                if getattr(self, "fsdp", False):  # sharded optimizer state: not saved (see docs/training.md)
                    continue
                ot, meta = ckpt.optimizer_to_flat(getattr(opt, "optimizer", opt), f"optim/{name}")
                tensors.update(ot)
                optim_meta[name] = meta
            tensors.update(self._scaler_tensors())
            state = {
                "data": {"rows_consumed": self.step * self.cfg.batch_size, "n_data": self.n_data},
                "optim": optim_meta,
                "config": config_to_dict(self.cfg),
                "num_processes": self.world,
            }
            path = ckpt.write_checkpoint(self.ckpt_root, self.step, tensors, state)
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()
        self.last_checkpoint = self.ckpt_root / ckpt.checkpoint_dir_name(self.step)
        return path

    def _scaler_tensors(self) -> dict[str, torch.Tensor]:
        """The fp16 loss scaler's state (scale and growth tracker), for exact resume; empty without one."""
        sc = getattr(self, "scaler", None)
        if sc is None or not sc.is_enabled():
            return {}
        sd = sc.state_dict()
        return {"scaler/scale": torch.tensor(float(sd["scale"]), dtype=torch.float64),
                "scaler/growth_tracker": torch.tensor(int(sd["_growth_tracker"]), dtype=torch.int64)}

    def _load_scaler(self, tensors: dict[str, torch.Tensor]) -> None:
        sc = getattr(self, "scaler", None)
        if sc is None or "scaler/scale" not in tensors:
            return
        sd = sc.state_dict()
        sd.update(scale=float(tensors["scaler/scale"]), _growth_tracker=int(tensors["scaler/growth_tracker"]))
        sc.load_state_dict(sd)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore networks, EMA, optimizers, method state and the data position from ``path``."""
        if getattr(self, "fsdp", False):
            raise ValueError(
                f"cannot resume {str(path)!r} under FSDP: FSDP checkpoints hold the gathered weights, EMA and "
                "method state (they load with load_model) but not the sharded optimizer state; resume without "
                "FSDP or start a new output_dir"
            )
        tensors, state = ckpt.read_checkpoint(path)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            for n, m in self.networks.items():
                m.load_state_dict(part(f"net/{n}."))
            for n, e in self.ema.items():
                e.load_state_dict(part(f"ema/{n}."))
            self.method.load_state_dict({k: v.to(self.device) for k, v in part("method/").items()})
            for name, opt in self.optimizers.items():
                ckpt.optimizer_from_flat(getattr(opt, "optimizer", opt), tensors, state["optim"][name],
                                         f"optim/{name}")
            self._load_scaler(tensors)
        except (RuntimeError, KeyError) as err:
            raise ValueError(
                f"checkpoint {str(path)!r} does not fit this run's method/networks: {err}"
            ) from err
        if state["data"]["n_data"] != self.n_data:
            raise ValueError(
                f"checkpoint {str(path)!r} was trained on {state['data']['n_data']} rows, "
                f"this data has {self.n_data}"
            )
        self.step = int(state["step"])
        self.last_checkpoint = Path(path)

    def _maybe_resume(self) -> None:
        r = self.cfg.resume
        if r == "none":
            return
        path = ckpt.latest_checkpoint(self.ckpt_root) if r == "auto" else Path(r)
        if path is not None:
            self.load_checkpoint(path)
