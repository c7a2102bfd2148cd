"""The call plan of fastgen's Diffusers schedulers and the small pure helpers around it.

A fastgen scheduler expands everything in ``set_timesteps`` into a *call plan*: one entry per
network evaluation (Heun's corrector and Restart's segments get their own entries), each with the
VE sigma the model is evaluated at, the sigma the returned state sits at, the solver stage and the
forward jumps to apply at the end of the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput

from fastgen.core.denoiser import PREDICTION_TYPES as VP_PREDICTION_TYPES
from fastgen.core.schedules import is_flow_config

STATE_SPACES = ("ve", "vp", "flow")
#: What a fastgen scheduler's ``prediction_type`` may be: the VP adapter's three plus flow velocity.
PREDICTION_TYPES = (*VP_PREDICTION_TYPES, "flow")
#: ``beta_schedule`` values (those of Diffusers' DDPM plus Heun's ``"exp"``).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")

#: Every Karras-family scheduler name plus the flow-matching ones: their config keys load silently.
COMPATIBLES = [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
]

BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
FLOW_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
             "base_image_seq_len", "max_image_seq_len")


@dataclass
class SchedulerStepOutput(BaseOutput):
    """``prev_sample``: the state for the next call (sample dtype); ``pred_original_sample``: x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def resolve_state_space(config: Any, state_space: str | None = None) -> str:
    """``state_space`` if given; else "flow" (flow-matching configs), "vp" (DDPMScheduler configs) or "ve"."""
    if state_space is not None:
        if state_space not in STATE_SPACES:
            raise ValueError(f"state_space must be one of {STATE_SPACES} or None, got {state_space!r}")
        return state_space
    cfg = dict(config or {})
    if is_flow_config(cfg):
        return "flow"
    ddpm_like = (
        isinstance(cfg.get("variance_type"), str) and "clip_sample" in cfg and "set_alpha_to_one" not in cfg
    )
    return "vp" if cfg.get("_class_name") == "DDPMScheduler" or ddpm_like else "ve"


def training_betas(config: Any) -> torch.Tensor:
    """float32 betas of a VP config exactly as Diffusers builds them (DDPM's rules; Heun's ``"exp"``)."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    schedule = config.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")
    if schedule == "exp":
        from diffusers.schedulers.scheduling_heun_discrete import betas_for_alpha_bar

        return betas_for_alpha_bar(n, alpha_transform_type="exp")
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=n, beta_start=config["beta_start"], beta_end=config["beta_end"],
                         beta_schedule=schedule).betas


@dataclass
class CallPlan:
    """One entry per network call (C entries).

    ``sigmas`` (C,) VE sigma at each call; ``after`` (C,) sigma of the state ``step`` returns;
    ``stage`` 0 (predictor / single call) or 1 (Heun corrector); ``step_from``/``step_to`` the sigmas of
    the solver step the call belongs to; ``jumps`` forward jumps ``(lo, hi)`` applied after the call;
    ``starts`` True where a main-process step begins (a valid begin index for img2img).
    """

    solver: str
    sigmas: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    stage: list[int] = field(default_factory=list)
    step_from: list[float] = field(default_factory=list)
    step_to: list[float] = field(default_factory=list)
    jumps: list[list[tuple[float, float]]] = field(default_factory=list)
    starts: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sigmas)

    def _add(self, sigma: float, stage: int, a: float, b: float, start: bool) -> None:
        self.sigmas.append(sigma)
        self.stage.append(stage)
        self.step_from.append(a)
        self.step_to.append(b)
        self.starts.append(start)


def build_call_plan(
    sigmas: torch.Tensor, solver: str, jumps: torch.Tensor | None = None, main: torch.Tensor | None = None
) -> CallPlan:
    """Expand a flat plan (sigmas + jump flags, see :class:`~fastgen.samplers.restart.RestartPlan`).

    ``solver`` is ``euler``, ``heun``, ``dpmpp_2m`` or ``ipndm`` (multistep solvers need no jumps).
    ``main`` (per transition) marks main-process steps; default: every non-jump transition.
    """
    s = sigmas.tolist()
    n = len(s) - 1
    jumps_l = [False] * n if jumps is None else jumps.tolist()
    main_l = [True] * n if main is None else main.tolist()
    plan = CallPlan(solver)
    i = 0
    while i < n:
        if jumps_l[i]:
            raise ValueError("a plan cannot start with a jump or have a jump before any step")
        a, b = s[i], s[i + 1]
        j = i + 1
        pending = []
        while j < n and jumps_l[j]:
            pending.append((s[j], s[j + 1]))
            j += 1
        plan._add(a, 0, a, b, bool(main_l[i]))
        if solver == "heun" and b > 0:  # the corrector call, at the next sigma
            plan.after.append(b)
            plan.jumps.append([])
            plan._add(b, 1, a, b, False)
        plan.after.append(s[j])
        plan.jumps.append(pending)
        i = j
    if plan.sigmas and plan.jumps[-1]:
        raise ValueError("a plan cannot end with a jump")
    return plan


def shift_flow_t(t: np.ndarray, shift: float, mu: float | None, dynamic: bool) -> np.ndarray:
    """Diffusers' flow shift: static ``s t / (1 + (s - 1) t)`` or dynamic ``e^mu / (e^mu + 1/t - 1)``."""
    t = np.asarray(t, dtype=np.float64)
    if dynamic:
        if mu is None:
            raise ValueError("mu is required when use_dynamic_shifting=True (flow pipelines pass mu=...)")
        with np.errstate(divide="ignore"):
            return np.where(t > 0, math.exp(mu) / (math.exp(mu) + (1 / np.maximum(t, 1e-300) - 1)), 0.0)
    return shift * t / (1 + (shift - 1) * t)


def seed_from_sample(sample: torch.Tensor) -> int:
    """A 63-bit seed determined by the bytes of ``sample`` (same latents -> same seed, any device)."""
    import hashlib

    data = sample.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1
