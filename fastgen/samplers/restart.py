"""Restart sampling (Xu et al., NeurIPS 2023) over a VE denoiser ``D(x, sigma) -> x0``.

Restart runs Heun steps of the probability-flow ODE on a main grid and, at chosen low noise
levels, repeatedly jumps *forward* with fresh noise from ``t_min`` to ``t_max`` and integrates back.
The jump contracts the error accumulated so far at nearly ODE cost.

Everything is expanded once into a :class:`RestartPlan`: a flat list of VE sigmas where every
decreasing pair is a Heun step (Euler when it lands on 0) and every increasing pair is a forward
jump ``x <- x + s_noise * sqrt(hi^2 - lo^2) * eps`` (no network call). The function
:func:`restart_sample` and the Diffusers :class:`~fastgen.samplers.RestartScheduler` both walk the
same plan, built by :func:`build_plan`, so they agree step for step.

A segment is ``(n_steps, k, t_min, t_max)``: ``n_steps`` (paper's N_R >= 2) points of the EDM/Karras
grid from ``t_max`` down to ``t_min``, i.e. ``n_steps - 1`` full Heun steps, repeated ``k`` times.
``t_min`` is snapped to the nearest main-grid sigma (the state's true level); ``t_max`` is not.
NFE = ``(2 N_main - 1) + sum_j 2 k_j (n_steps_j - 1)`` (:func:`restart_nfe`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastgen.core import solvers
from fastgen.core.schedules import karras, validate_sigmas

__all__ = [
    "RestartSegment",
    "RestartPlan",
    "RestartPreset",
    "PRESETS",
    "as_segments",
    "build_plan",
    "auto_plan",
    "auto_segments",
    "snap_to_grid",
    "get_preset",
    "restart_nfe",
    "restart_sample",
    "draw_noise",
    "jump",
]


@dataclass(frozen=True)
class RestartSegment:
    """One restart interval: ``n_steps`` grid points (>= 2) from ``t_max`` to ``t_min``, ``k`` repeats (>= 0).

    ``t_min`` and ``t_max`` are VE sigmas with ``0 < t_min < t_max``.
    """

    n_steps: int
    k: int
    t_min: float
    t_max: float


def as_segments(segments: Iterable[Any] | None) -> tuple[RestartSegment, ...]:
    """Validate segments given as :class:`RestartSegment` or ``(n_steps, k, t_min, t_max)`` sequences."""
    out = []
    for j, seg in enumerate(segments or ()):
        if not isinstance(seg, RestartSegment):
            try:
                n_steps, k, t_min, t_max = seg
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"segments[{j}] must be (n_steps, k, t_min, t_max), got {seg!r}"
                ) from err
            seg = RestartSegment(n_steps, k, t_min, t_max)
        if isinstance(seg.n_steps, bool) or not isinstance(seg.n_steps, int) or seg.n_steps < 2:
            raise ValueError(
                f"segments[{j}].n_steps must be an integer >= 2 (grid points), got {seg.n_steps!r}"
            )
        if isinstance(seg.k, bool) or not isinstance(seg.k, int) or seg.k < 0:
            raise ValueError(f"segments[{j}].k (restart repeats) must be an integer >= 0, got {seg.k!r}")
        t_min, t_max = float(seg.t_min), float(seg.t_max)
        if not (0 < t_min < t_max < float("inf")):
            raise ValueError(
                f"segments[{j}] needs 0 < t_min < t_max < inf (VE sigmas), got t_min={t_min}, t_max={t_max}"
            )
        out.append(RestartSegment(seg.n_steps, seg.k, t_min, t_max))
    return tuple(out)


def restart_nfe(n_main: int, segments: Iterable[Any] = ()) -> int:
    """The paper's NFE count: ``(2 n_main - 1) + sum_j k_j * 2 * (n_steps_j - 1)``.

    ``n_main`` is the number of positive main-grid points (the main process ends with an Euler step
    to 0). Equals :attr:`RestartPlan.nfe` of the plan built from the same inputs without churn.
    """
    if isinstance(n_main, bool) or not isinstance(n_main, int) or n_main < 1:
        raise ValueError(f"n_main must be an integer >= 1, got {n_main!r}")
    return 2 * n_main - 1 + sum(2 * s.k * (s.n_steps - 1) for s in as_segments(segments))


@dataclass(frozen=True)
class RestartPlan:
    """A flat Restart plan.

    ``sigmas`` (M+1,) float64 VE sigmas; transition ``i`` goes from ``sigmas[i]`` to ``sigmas[i+1]``.
    ``jumps`` (M,) bool: True where the transition is a forward noise jump (``sigmas[i+1] > sigmas[i]``,
    no network call); otherwise it is a Heun step, or an Euler step when ``sigmas[i+1] == 0``.
    ``s_noise`` scales the jump noise. ``main`` (M,) bool, optional: True for main-process steps
    (where a Diffusers pipeline may begin, e.g. img2img); None means every non-jump transition.
    """

    sigmas: torch.Tensor
    jumps: torch.Tensor
    s_noise: float = 1.0
    main: torch.Tensor | None = None

    @property
    def nfe(self) -> int:
        """Exact number of denoiser calls."""
        s = self.sigmas
        steps = ~self.jumps
        to_zero = steps & (s[1:] == 0)
        return int(2 * steps.sum() - to_zero.sum())

    @property
    def num_steps(self) -> int:
        """Number of solver steps (transitions that are not jumps)."""
        return int((~self.jumps).sum())

    def runs(self) -> list[tuple[str, int, int]]:
        """Maximal runs of the plan as ``("heun" | "jump", start, end)`` index ranges into ``sigmas``."""
        out: list[tuple[str, int, int]] = []
        flags = self.jumps.tolist()
        start = 0
        for i in range(1, len(flags) + 1):
            if i == len(flags) or flags[i] != flags[start]:
                out.append(("jump" if flags[start] else "heun", start, i))
                start = i
        return out


def build_plan(
    sigmas: Any,
    segments: Iterable[Any] = (),
    *,
    s_noise: float = 1.0,
    churn: float = 0.0,
    churn_tmin: float = 0.01,
    churn_tmax: float = 1.0,
    rho: float = 7.0,
) -> RestartPlan:
    """Expand a main grid and restart segments into a flat :class:`RestartPlan`.

    - ``sigmas``: the main grid, VE sigmas, strictly decreasing (usually ending in 0).
    - ``segments``: ``(n_steps, k, t_min, t_max)`` each; ``t_min`` is snapped to the nearest positive
      main-grid sigma after the first; the segment runs right after the main step that lands there.
      Several segments at one snapped point run in the order given.
    - ``churn``: EDM churn gamma applied at each in-segment step whose start sigma lies in
      ``[churn_tmin, churn_tmax]`` (official CIFAR-10 and ImageNet setting: 0.05 on [0.01, 1]); it appears in the
      plan as a small jump ``t -> t (1 + churn)``. The main process stays deterministic.
    """
    main = validate_sigmas(sigmas, "sigmas").detach().double().cpu()
    segs = as_segments(segments)
    if s_noise < 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise}")
    if not 0 <= churn <= 2**0.5 - 1:
        raise ValueError(f"churn (gamma) must be in [0, sqrt(2) - 1], got {churn}")
    positive = main[main > 0]
    by_index: dict[int, list[RestartSegment]] = {}
    for j, seg in enumerate(segs):
        lo, hi = float(positive[-1]), float(main[0])
        if seg.t_min < lo * (1 - 1e-9) or seg.t_max > hi * (1 + 1e-9):
            raise ValueError(
                f"segments[{j}] (t_min={seg.t_min}, t_max={seg.t_max}) lies outside the schedule's range "
                f"[{lo:.6g}, {hi:.6g}] (VE sigmas)"
            )
        idx = int(torch.argmin((positive - seg.t_min).abs()))
        if idx == 0:
            raise ValueError(
                f"segments[{j}].t_min={seg.t_min} snaps to the first grid sigma {float(positive[0]):.6g}; "
                "a restart needs a main step landing on t_min"
            )
        if float(positive[idx]) >= seg.t_max:
            raise ValueError(
                f"segments[{j}]: t_min={seg.t_min} snaps to grid sigma {float(positive[idx]):.6g}, "
                f"which is not below t_max={seg.t_max}"
            )
        by_index.setdefault(idx, []).append(seg)

    out: list[float] = [float(main[0])]
    jumps: list[bool] = []
    is_main: list[bool] = []

    def push(value: float, jump: bool, on_main: bool = False) -> None:
        out.append(value)
        jumps.append(jump)
        is_main.append(on_main)

    for i in range(1, len(main)):
        push(float(main[i]), False, True)
        for seg in by_index.get(i, ()):
            t_min = float(main[i])
            grid = karras(seg.n_steps, t_min, seg.t_max, rho=rho)[:-1].tolist()
            grid[0], grid[-1] = seg.t_max, t_min
            for _ in range(seg.k):
                push(seg.t_max, True)
                for t_cur, t_next in zip(grid[:-1], grid[1:]):
                    if churn > 0 and churn_tmin <= t_cur <= churn_tmax:
                        push(t_cur * (1 + churn), True)
                    push(t_next, False)
    return RestartPlan(
        torch.tensor(out, dtype=torch.float64), torch.tensor(jumps, dtype=torch.bool), float(s_noise),
        torch.tensor(is_main, dtype=torch.bool),
    )


def auto_segments(steps: int) -> tuple[int, tuple[RestartSegment, ...]]:
    """AUTOMATIC1111's automatic configuration for a total of ``steps`` solver steps.

    Returns ``(n_main, segments)``: below 20 steps no restart; 20-35: 9 restart steps once; 36 or
    more: ``steps // 4`` restart steps twice; one segment on [0.1, 2.0] with ``restart_steps + 1``
    grid points, so ``n_main + k * restart_steps == steps``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps (num_inference_steps) must be an integer >= 1, got {steps!r}")
    if steps < 20:
        return steps, ()
    restart_steps, times = (9, 1) if steps < 36 else (steps // 4, 2)
    return steps - restart_steps * times, (RestartSegment(restart_steps + 1, times, 0.1, 2.0),)


def snap_to_grid(main: Any, segments: Iterable[Any]) -> tuple[RestartSegment, ...]:
    """A1111's snapping: both ``t_min`` and ``t_max`` of each segment move to the nearest main-grid sigma.

    ``main`` is the main grid (VE sigmas, decreasing, usually ending in 0). A segment whose snapped
    ``t_max`` is not above its snapped ``t_min`` is dropped, as A1111 skips it.
    """
    grid = validate_sigmas(main, "main").detach().double().cpu()
    out = []
    for seg in as_segments(segments):
        lo_idx = int(torch.argmin((grid - seg.t_min).abs()))
        hi_idx = int(torch.argmin((grid - seg.t_max).abs()))
        if hi_idx < lo_idx:
            out.append(RestartSegment(seg.n_steps, seg.k, float(grid[lo_idx]), float(grid[hi_idx])))
    return tuple(out)


def auto_plan(
    steps: int, sigma_min: float, sigma_max: float, *, rho: float = 7.0, s_noise: float = 1.0
) -> RestartPlan:
    """The A1111 plan: a Karras main grid over ``steps - restart_steps * k`` points plus one segment.

    As in A1111's ``sample_restart``, the segment's ``t_min`` (0.1) and ``t_max`` (2.0) are snapped to
    the nearest main-grid sigmas (:func:`snap_to_grid`): at 20 or 30 steps on the SD range
    [0.0292, 14.6146], ``t_max`` becomes 2.2327; at 40 steps, 1.9914.
    """
    n_main, segs = auto_segments(steps)
    main = karras(n_main, sigma_min, sigma_max, rho=rho)
    return build_plan(main, snap_to_grid(main, segs), s_noise=s_noise, rho=rho)


@dataclass(frozen=True)
class RestartPreset:
    """A published Restart configuration (main Heun points on a Karras grid plus segments)."""

    n_main: int
    segments: tuple[RestartSegment, ...]
    s_noise: float = 1.0
    churn: float = 0.0
    churn_tmin: float = 0.01
    churn_tmax: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    note: str = ""

    @property
    def nfe(self) -> int:
        """The paper's NFE for this configuration."""
        return restart_nfe(self.n_main, self.segments)

    def plan(
        self, sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0
    ) -> RestartPlan:
        """Build the plan on ``karras(n_main, sigma_min, sigma_max)`` (defaults: the preset's range)."""
        smin = self.sigma_min if sigma_min is None else sigma_min
        smax = self.sigma_max if sigma_max is None else sigma_max
        return build_plan(
            karras(self.n_main, smin, smax, rho=rho), self.segments, s_noise=self.s_noise, churn=self.churn,
            churn_tmin=self.churn_tmin, churn_tmax=self.churn_tmax, rho=rho,
        )


def _cifar(n_main: int, n_r: int, k: int, t_min: float, t_max: float, note: str) -> RestartPreset:
    # the official CIFAR-10 runs use in-segment churn 0.05 on [0.01, 1] (S_min, S_max), as ImageNet does
    return RestartPreset(n_main, (RestartSegment(n_r, k, t_min, t_max),), churn=0.05, note=note)


_IMAGENET_INTERVALS = ((19.35, 40.79), (1.09, 1.92), (0.59, 1.09), (0.30, 0.59), (0.06, 0.30))


def _imagenet(n_main: int, cells: Sequence[tuple[int, int] | None], note: str) -> RestartPreset:
    segs = tuple(
        RestartSegment(c[0], c[1], lo, hi) for c, (lo, hi) in zip(cells, _IMAGENET_INTERVALS) if c is not None
    )
    return RestartPreset(n_main, segs, s_noise=1.003, churn=0.05, note=note)


def _sd(segs: Sequence[tuple[int, int, float, float]], note: str) -> RestartPreset:
    return RestartPreset(
        30, as_segments(segs), sigma_min=0.0292, sigma_max=14.6146, note=note,
    )


#: Published configurations (Xu et al. 2023, Tables and README). Names end in the paper's NFE.
PRESETS: dict[str, RestartPreset] = {
    "cifar10-vp-519": _cifar(20, 9, 30, 0.06, 0.20, "CIFAR-10 VP, FID 2.11"),
    "cifar10-vp-115": _cifar(18, 3, 20, 0.06, 0.30, "CIFAR-10 VP, FID 2.21"),
    "cifar10-vp-75": _cifar(18, 3, 10, 0.06, 0.30, "CIFAR-10 VP, FID 2.27"),
    "cifar10-vp-55": _cifar(18, 3, 5, 0.06, 0.30, "CIFAR-10 VP, FID 2.45"),
    "cifar10-vp-43": _cifar(18, 3, 2, 0.06, 0.30, "CIFAR-10 VP, FID 2.70"),
    "cifar10-edm-43": _cifar(18, 3, 2, 0.14, 0.30, "CIFAR-10 EDM-VP, FID 1.90"),
    "imagenet64-623": _imagenet(36, [(10, 3), (10, 3), (7, 6), (7, 6), (7, 25)], "ImageNet-64 EDM, FID 1.36"),
    "imagenet64-535": _imagenet(36, [(6, 1), (6, 1), (7, 6), (7, 6), (7, 25)], "ImageNet-64 EDM, FID 1.39"),
    "imagenet64-385": _imagenet(36, [(3, 1), (6, 1), (6, 5), (6, 5), (6, 20)], "ImageNet-64 EDM, FID 1.41"),
    "imagenet64-203": _imagenet(36, [(4, 1), (4, 1), (4, 5), (4, 5), (6, 6)], "ImageNet-64 EDM, FID 1.46"),
    "imagenet64-165": _imagenet(18, [(3, 1), (4, 1), (4, 5), (4, 5), (4, 10)], "ImageNet-64 EDM, FID 1.51"),
    "imagenet64-99": _imagenet(18, [(3, 1), (4, 1), (4, 4), (4, 1), (4, 4)], "ImageNet-64 EDM, FID 1.71"),
    "imagenet64-67": _imagenet(18, [(5, 1), (5, 1), (5, 1), None, (5, 1)], "ImageNet-64 EDM, FID 1.95"),
    "imagenet64-39": _imagenet(14, [(3, 1), (3, 1), None, None, (3, 1)], "ImageNet-64 EDM, FID 2.38"),
    # Stable Diffusion 1.5 (paper: DDIM main process, 30 steps); here the main process is Heun.
    "sd15-w2": _sd([(5, 2, 1.0, 9.0), (5, 2, 5.0, 10.0)], "SD1.5 guidance 2, FID 13.16"),
    "sd15-w3": _sd([(10, 2, 0.1, 3.0)], "SD1.5 guidance 3, FID 14.48"),
    "sd15-w5": _sd([(10, 2, 0.1, 2.0)], "SD1.5 guidance 5, FID 16.21"),
    "sd15-w8": _sd([(10, 2, 0.1, 2.0)], "SD1.5 guidance 8, FID 18.40"),
}


def get_preset(name: str) -> RestartPreset:
    """Look up a named preset from :data:`PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def draw_noise(x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` drawn from ``generator`` (on its device), cast to x's dtype.

    Always drawn in float32, so float32 and float64 runs with the same generator see the same noise.

    A list of generators draws one sample per batch element (Diffusers' convention). The scheduler and
    :func:`restart_sample` both use this, so equal generators give equal jumps.
    """
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ValueError(f"generator list has {len(generator)} entries for a batch of {x.shape[0]}")
        return torch.cat([draw_noise(x[i : i + 1], g) for i, g in enumerate(generator)])
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device, x.dtype)


def jump(x: torch.Tensor, lo: float, hi: float, s_noise: float, generator: Any) -> torch.Tensor:
    """Forward jump of the VE state from sigma ``lo`` to ``hi``: ``x + s_noise sqrt(hi^2 - lo^2) eps``."""
    return x + (s_noise * (hi * hi - lo * lo) ** 0.5) * draw_noise(x, generator)


def restart_sample(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Any = None,
    segments: Iterable[Any] = (),
    *,
    plan: RestartPlan | None = None,
    s_noise: float = 1.0,
    churn: float = 0.0,
    churn_tmin: float = 0.01,
    churn_tmax: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: solvers.Callback = None,
    check_finite: bool = True,
    **cond: Any,
) -> torch.Tensor:
    """Restart sampling from the VE state ``x`` at ``sigmas[0]`` (e.g. ``noise * sigmas[0]``).

    Either give the main grid ``sigmas`` (VE, decreasing, ending in 0) with ``segments``
    ``(n_steps, k, t_min, t_max)`` (see :func:`build_plan`), or a ready ``plan`` (from
    :func:`build_plan`, :func:`auto_plan` or :meth:`RestartPreset.plan`). Heun steps reuse
    :func:`fastgen.core.solvers.heun`; jump noise comes only from ``generator``. Returns the state at
    the plan's last sigma, in x's dtype. ``cond`` goes to every denoiser call; the number of calls
    is ``plan.nfe``. With no segments this is exactly ``solvers.heun``.
    """
    if plan is None:
        if sigmas is None:
            raise ValueError("give the main grid `sigmas` (VE, decreasing) or a `plan`")
        plan = build_plan(sigmas, segments, s_noise=s_noise, churn=churn, churn_tmin=churn_tmin,
                          churn_tmax=churn_tmax)
    elif sigmas is not None or tuple(segments):
        raise ValueError("give either `plan` or `sigmas`/`segments`, not both")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor (the VE state at the plan's first sigma)")
    s = plan.sigmas.to(x.device)
    offset = 0
    for kind, a, b in plan.runs():
        if kind == "jump":
            for i in range(a, b):
                x = jump(x, float(s[i]), float(s[i + 1]), plan.s_noise, generator)
            continue
        cb = None
        if callback is not None:
            def cb(info: dict[str, Any], _off: int = offset) -> None:
                callback({**info, "i": info["i"] + _off})
        x = solvers.heun(denoiser, x, s[a : b + 1], callback=cb, check_finite=check_finite, **cond)
        offset += b - a
    return x
