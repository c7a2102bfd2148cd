"""SFD: Simple and Fast Distillation (Zhou et al., NeurIPS 2024): the teacher fine-tuned into a K-step Euler sampler.

Card: ``shared/methods/sfd.md``. In fastgen's VE sigma space (``x = x0 + sigma eps``, denoiser ``D``):

- **Grids.** The student's ``K = num_steps`` timestamps are the polynomial (Karras, rho) grid on
  ``[sigma_min, sigma_max]`` (no final step to 0); the teacher solves on the nested grid of
  ``K' = (M + 1)(K - 1) + 1`` points (``M = inserted``), whose index ``(M + 1) i`` is student stamp ``i``
  (:func:`sfd_grids` asserts it).
- **Student step:** Euler, ``x_{i+1} = x_i + (s_{i+1} - s_i)(x_i - D_theta(x_i, s_i)) / s_i``.
- **AFS:** step 0 is :func:`fastgen.models.fewstep.afs_step` (no network call); NFE = K - 1 - [afs].
- **Targets:** the frozen teacher's trajectory from the same noise by ``teacher_solver`` on the fine grid
  (computed once per batch, without AFS).
- **Loss at stamp i -> i+1:** ``sum_pixels |x^stu_{i+1} - x^tea_{i+1}|`` averaged over the batch (``loss: l2``:
  squared), where ``x^stu_i`` is the student's own *detached* previous output (the global trajectory view).
- **Updates** (``updates: sequential``, the official loop): one optimizer step per stamp, so one batch of
  trajectories spans ``K - 1 - [afs]`` trainer steps and each stamp's forward sees the parameters updated by
  the previous stamp; ``summed``: one step per batch on the sum of the stamp losses (a different algorithm).
- **SFD-v:** with ``num_steps_choices`` (e.g. ``[4, 5, 6, 7]``) every batch draws its K uniformly; with
  ``step_condition`` the network gets the scalar condition ``sfd_steps = K`` through a zero-initialised
  embedding (:func:`fastgen.distill.finetune.student_copy`), so the student starts exactly at the teacher.

The lr drop x0.1 at half of training is the trainer's ``optim.decay_start: S/2, decay_end: S/2 + 1,
final_lr_ratio: 0.1``; no EMA, no gradient clipping (``grad_clip: null``) in the shipped configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastgen.core.schedules import karras
from fastgen.core.solvers import euler_step, get_solver
from fastgen.distill.finetune import (
    ConditionSampler,
    StudentOfTeacherMethod,
    load_teacher,
    save_fewstep,
    student_copy,
)
from fastgen.models.fewstep import FewStepStudent, afs_step
from fastgen.train.config import check_fields

__all__ = ["SFDConfig", "SFD", "sfd_grids", "teacher_stamps", "from_config", "LOSSES", "UPDATES", "STEP_SCALAR"]

LOSSES = ("l1", "l2")
UPDATES = ("sequential", "summed")
STEP_SCALAR = "sfd_steps"


def sfd_grids(num_steps: int, inserted: int, sigma_min: float, sigma_max: float, rho: float = 7.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student (K,), teacher (K',))`` float64 polynomial grids, ``K' = (M+1)(K-1) + 1``; the teacher grid
    holds the student grid at indices ``(M+1) i`` to 1e-12 relative (``AssertionError`` otherwise)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2 (timestamps), got {num_steps!r}")
    if isinstance(inserted, bool) or not isinstance(inserted, int) or inserted < 0:
        raise ValueError(f"inserted must be an integer >= 0 (teacher points per interval), got {inserted!r}")
    student = karras(num_steps, sigma_min, sigma_max, rho)[:-1]
    fine = karras((inserted + 1) * (num_steps - 1) + 1, sigma_min, sigma_max, rho)[:-1]
    nested = fine[:: inserted + 1]
    assert torch.allclose(nested, student, rtol=1e-12, atol=0), "SFD grids do not nest"
    return student, fine


@torch.no_grad()
def teacher_stamps(teacher: Any, x: torch.Tensor, fine: torch.Tensor, inserted: int, solver: str = "ipndm",
                   **cond: Any) -> torch.Tensor:
    """The teacher's states at the student stamps, ``(K, *x.shape)``: ``solver`` from ``x`` (the state at
    ``fine[0]``) over the fine grid, every ``(M+1)``-th state kept (the first is ``x``)."""
    states = [x]

    def keep(info: dict[str, Any]) -> None:
        if (info["i"] + 1) % (inserted + 1) == 0:
            states.append(info["x"])

    get_solver(solver)(teacher, x, fine.to(x.dtype), callback=keep, **cond)
    return torch.stack(states)


@dataclass
class SFDConfig:
    """SFD options (see the module docstring). ``sample_shape``/``sigma_max`` default to the teacher's and
    ``sigma_min`` to ``max(0.006, teacher's sigma_min)`` (:func:`from_config`)."""

    num_steps: int = 4
    inserted: int = 3
    afs: bool = True
    sigma_min: float = 0.006
    sigma_max: float | None = None
    rho: float = 7.0
    teacher_solver: str = "ipndm"
    loss: str = "l1"
    updates: str = "sequential"
    num_steps_choices: list[int] | None = None
    step_condition: bool = True
    sample_shape: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        get_solver(self.teacher_solver)  # ValueError naming the solvers
        if self.loss not in LOSSES:
            raise ValueError(f"method.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.updates not in UPDATES:
            raise ValueError(f"method.updates must be one of {UPDATES}, got {self.updates!r}")
        least = 3 if self.afs else 2
        for k in [self.num_steps, *(self.num_steps_choices or [])]:
            if isinstance(k, bool) or not isinstance(k, int) or k < least:
                raise ValueError(f"method.num_steps{'_choices' if self.num_steps_choices else ''} must be integers "
                                 f">= {least} (timestamps; afs={self.afs}), got {k!r}")
        if self.num_steps_choices is not None and not self.num_steps_choices:
            raise ValueError("method.num_steps_choices must be null or a non-empty list of timestamp counts")
        if not (self.sigma_min > 0 and (self.sigma_max is None or self.sigma_max > self.sigma_min)):
            raise ValueError(f"method.sigma_min must be > 0 and < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        sfd_grids(self.num_steps, self.inserted, self.sigma_min, self.sigma_max or 80.0, self.rho)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SFDConfig:
        check_fields(cls, d, "sfd method option(s)")
        d = dict(d)
        if d.get("sample_shape") is not None:
            d["sample_shape"] = tuple(int(s) for s in d["sample_shape"])
        return cls(**d)


@dataclass
class _Chain:
    """One batch of trajectories in flight: its grid, teacher stamps, conditions and the student's state."""

    k: int
    grid: torch.Tensor
    targets: torch.Tensor
    cond: dict[str, Any]
    x: torch.Tensor
    pos: int


class SFD(StudentOfTeacherMethod):
    """The SFD method (implements :class:`fastgen.train.method.Method`): network ``student`` (a trainable copy
    of the teacher's denoiser), optimizer ``main``, frozen ``teacher``, no EMA.

    Args:
        teacher: the frozen denoiser ``D(x, sigma, **cond)``.
        student: the trainable denoiser (same contract), e.g. :func:`fastgen.distill.finetune.student_copy`.
        config: :class:`SFDConfig` (``sample_shape`` and ``sigma_max`` must be set).
        conditions: draws per-batch conditions (default: none).
        recipe: ``{"network", "wrap"}`` of the student (for saving).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: SFDConfig,
                 conditions: ConditionSampler | None = None, recipe: dict[str, Any] | None = None) -> None:
        if config.sample_shape is None or config.sigma_max is None:
            raise ValueError("SFDConfig.sample_shape and sigma_max must be set (from_config takes the teacher's)")
        self.config = config
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.conditions = conditions
        self.recipe = recipe
        self.class_conditional = conditions is not None and conditions.kind == "class"
        self.step_scalar = STEP_SCALAR if (config.num_steps_choices and config.step_condition) else None
        self.last_logs: dict[str, float] = {}
        self._chains: dict[int, _Chain] = {}
        self._batches = 0  # trajectories drawn so far (per shard slot 0): seeds SFD-v's choice of K
        self._call_step, self._call_index = -1, 0

    # ------------------------------------------------------------------ Method protocol
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The batches in flight (sequential updates span several trainer steps) for exact resume."""
        out = {"batches": torch.tensor([self._batches], dtype=torch.long)}
        for j, c in self._chains.items():
            out.update({f"chain{j}.k": torch.tensor([c.k]), f"chain{j}.pos": torch.tensor([c.pos]),
                        f"chain{j}.targets": c.targets, f"chain{j}.x": c.x})
            out.update({f"chain{j}.cond.{k}": v for k, v in c.cond.items() if isinstance(v, torch.Tensor)})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "batches" not in state:
            raise ValueError("SFD state must contain 'batches'")
        self._batches = int(state["batches"][0])
        self._chains = {}
        for key in state:
            if key.startswith("chain") and key.endswith(".k"):
                j = int(key[len("chain"):-len(".k")])
                pre = f"chain{j}."
                k = int(state[pre + "k"][0])
                cond = {n[len(pre + "cond."):]: v for n, v in state.items() if n.startswith(pre + "cond.")}
                self._chains[j] = _Chain(k, self.grid(k)[0], state[pre + "targets"], cond, state[pre + "x"],
                                         int(state[pre + "pos"][0]))

    # ------------------------------------------------------------------ pieces
    def grid(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher grids for ``k`` timestamps (float64)."""
        c = self.config
        return sfd_grids(k, c.inserted, c.sigma_min, float(c.sigma_max), c.rho)

    def _cond(self, n: int, generator: torch.Generator, device: torch.device) -> dict[str, Any]:
        return self.conditions.draw(n, generator, device) if self.conditions is not None else {}

    def new_chain(self, n: int, generator: torch.Generator, device: torch.device) -> _Chain:
        """A fresh batch: K (SFD-v: drawn per batch), noise, conditions, teacher stamps; AFS applied."""
        c = self.config
        k = c.num_steps
        if c.num_steps_choices:
            g = torch.Generator().manual_seed(c.seed * 1_000_003 + self._batches)  # same K on every shard
            k = int(c.num_steps_choices[int(torch.randint(len(c.num_steps_choices), (1,), generator=g))])
        self._batches += 1
        grid, fine = self.grid(k)
        z = torch.randn((n, *c.sample_shape), generator=generator, device=generator.device).to(device)
        cond = self._cond(n, generator, device)
        x0 = z * float(grid[0])
        targets = teacher_stamps(self.teacher, x0, fine, c.inserted, c.teacher_solver, **cond)
        chain = _Chain(k, grid, targets, cond, x0, 0)
        if c.afs:
            chain.x, chain.pos = afs_step(x0, float(grid[0]), float(grid[1])), 1
        return chain

    def student_step(self, x: torch.Tensor, s: float, s_next: float, cond: Mapping[str, Any], k: int) -> torch.Tensor:
        """One Euler step of the student from ``x`` (detached) at ``s`` to ``s_next``."""
        kw = dict(cond)
        if self.step_scalar:
            kw[self.step_scalar] = float(k)
        sig = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        return euler_step(x, self.student(x, sig, **kw), s, s_next)

    def stamp_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``sum_pixels |out - target|`` (or squared) averaged over the batch."""
        diff = (out.float() - target.float()).reshape(out.shape[0], -1)
        per = diff.abs() if self.config.loss == "l1" else diff**2
        return per.sum(1).mean()

    def _slot(self, step: int) -> int:
        if step != self._call_step:
            self._call_step, self._call_index = step, 0
        j, self._call_index = self._call_index, self._call_index + 1
        return j

    def step(self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
             ) -> dict[str, torch.Tensor]:
        """Sequential: one stamp of the batch in flight (a new batch when the last one is done); summed: a whole
        batch. The batch's rows only set the batch size (SFD is data-free)."""
        n = next(iter(batch.values())).shape[0]
        dev = next(iter(batch.values())).device
        j = self._slot(step)
        if self.config.updates == "summed":
            chain = self.new_chain(n, generator, dev)
            losses = []
            while chain.pos < chain.k - 1:
                losses.append(self._advance(chain))
            self.last_logs = {"stamps": float(len(losses)), "num_steps": float(chain.k)}
            return {"main": torch.stack(losses).sum()}
        chain = self._chains.get(j)
        if chain is None or chain.pos >= chain.k - 1:
            chain = self._chains[j] = self.new_chain(n, generator, dev)
        stamp = chain.pos
        loss = self._advance(chain)
        self.last_logs = {"stamp": float(stamp), "num_steps": float(chain.k)}
        return {"main": loss}

    def _advance(self, chain: _Chain) -> torch.Tensor:
        i = chain.pos
        out = self.student_step(chain.x.detach(), float(chain.grid[i]), float(chain.grid[i + 1]), chain.cond, chain.k)
        loss = self.stamp_loss(out, chain.targets[i + 1])
        chain.x, chain.pos = out.detach(), i + 1
        return loss

    def generator(self, net: nn.Module | None = None, num_steps: int | None = None) -> FewStepStudent:
        """The few-step sampler of ``net`` (default: the student) on the grid of ``num_steps`` timestamps."""
        k = num_steps or self.config.num_steps
        grid, _ = self.grid(k)
        return FewStepStudent(net if net is not None else self.student, grid.tolist(), afs=self.config.afs,
                              step_scalar=self.step_scalar, recipe=self.recipe)

    def save_student(self, gen: FewStepStudent, path: Any, metadata: Mapping[str, Any] | None = None,
                     half: bool = False) -> Any:
        """Write the few-step student next to a run (see :func:`fastgen.distill.finetune.save_fewstep`)."""
        return save_fewstep(gen, path, self.config.sample_shape, metadata, half)[0]


def from_config(cfg: Any) -> SFD:
    """Factory for ``method: {name: sfd, teacher: SOURCE, [init: SOURCE], [class_conditional], [prompts],
    ...SFDConfig fields}``; ``teacher`` is any :func:`fastgen.models.load_model` source."""
    kw = {k: v for k, v in cfg.method.items() if k != "name"}
    if "teacher" not in kw:
        raise ValueError("method.teacher is required (a load_model source such as 'digits-edm')")
    model, recipe = load_teacher(kw.pop("teacher"))
    init = kw.pop("init", None)
    conditions = ConditionSampler(model, kw.pop("class_conditional", None), kw.pop("prompts", None))
    kw.setdefault("sample_shape", tuple(model.shape))
    kw.setdefault("sigma_max", float(model.sigma_max))
    kw.setdefault("sigma_min", max(SFDConfig.sigma_min, float(model.sigma_min)))  # 0.006, or the teacher's floor
    kw.setdefault("seed", int(cfg.seed))
    scfg = SFDConfig.from_dict(kw)
    if scfg.sigma_min < model.sigma_min * (1 - 1e-6) or scfg.sigma_max > model.sigma_max * (1 + 1e-6):
        raise ValueError(f"method.sigma_min/sigma_max [{scfg.sigma_min}, {scfg.sigma_max}] leave the teacher's "
                         f"range [{model.sigma_min}, {model.sigma_max}]")
    scalar = STEP_SCALAR if (scfg.num_steps_choices and scfg.step_condition) else None
    student, srecipe = student_copy(model, recipe, init, scalar)
    return SFD(model.denoiser, student, scfg, conditions, srecipe)
