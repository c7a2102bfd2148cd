"""Text-to-image f-distill: one-step students of Diffusers pipelines (SD-style CFG UNets, SD3-style flows).

A run config names the data set ``t2i`` (registered here) and ``method.name: fdistill``::

    data:
      name: t2i
      model: digits-sd            # any load_model source with prompts (a shipped pipeline, a folder)
      prompts: PROMPT_FILE        # one prompt a line (or a YAML list)
      real: teacher               # "teacher" (teacher samples per prompt) or an image folder / .npz
      real_per_prompt: 100        # teacher samples per prompt
      teacher_steps: 30           # the pipeline's own scheduler, its default (the card's) steps ...
      guidance: 1.5               # ... and CFG scale
      negative_prompt: ""         # the unconditional branch of CFG
      cache_dir: runs/x/cache     # embeddings and latents are cached here (null: in memory only)
    method: {name: fdistill, guidance_scale: 1.5, time_sampling: timestep, t_range: [0.02, 0.98], ...}

What is computed once (:func:`prepare`, cached on disk under ``cache_dir`` by a fingerprint of the model,
the prompts and the real-data settings, and in memory for the process): the embeddings of every prompt and
of the negative prompt (one encoder pass), and the real latents (teacher samples through the pipeline, or
images encoded with the VAE's posterior mean, ``(mean - shift_factor) * scaling_factor``). Data rows are
``{"x": latent (C, H, W), "prompt": index[, "z": the teacher sample's initial noise]}``; the method looks
embeddings up by index (a :class:`PromptTable`), so no prompt is ever re-encoded during training. Images
without prompts (a folder without captions, an ``.npz`` without ``prompts``) get the prompts cyclically.

The method (:class:`TextToImageDistill`, an :class:`~fastgen.distill.fdistill.FDistill`): the student is a
teacher copy evaluated at one fixed time -- ``sigma_max`` (the last training timestep) for VP/epsilon
UNets, flow time ``t = 1`` exactly (``x = z - v(z, 1)``) for flow transformers; the teacher is CFG-guided
with ``guidance_scale`` against the negative-prompt embedding; diffusion times are drawn by
``time_sampling``: ``timestep`` (integer training timesteps uniform over ``t_range`` of the table, DMD2's SD
recipe), ``flow`` (flow time uniform over ``t_range``, VE sigma by :func:`fastgen.core.schedules.flow_t_to_sigma`)
or ``karras`` (FDistill's own grid). ``regression_steps`` (default 0) first fits the student to the teacher
pairs ``(z, x)`` by latent MSE (DMD's regression loss, here a warm-up; needs ``real: teacher``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.core.schedules import flow_t_to_sigma
from fastgen.data.prompts import cached_tensors, embed_prompts, fingerprint, load_images, read_prompts
from fastgen.data.registry import register_dataset
from fastgen.distill.fconfig import FDistillConfig
from fastgen.distill.fdistill import FDistill
from fastgen.distill.student import OneStepStudent

__all__ = ["TextToImageDistill", "PromptTable", "prepare", "from_config", "TIME_SAMPLINGS", "CONFIGS_DIR"]

TIME_SAMPLINGS = ("timestep", "flow", "karras")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "distill"
_PREPARED: dict[str, dict[str, Any]] = {}  # fingerprint -> prepared tensors (this process)


class PromptTable(nn.Module):
    """Condition tensors of P prompts (buffers ``{key: (P, ...)}``) and of the negative prompt.

    ``table(idx)`` -> ``{key: rows idx}``; ``table.null(n)`` -> the negative-prompt condition for ``n``
    samples. A frozen module (moved with the method, never trained, no encoder inside)."""

    def __init__(self, table: Mapping[str, torch.Tensor], null: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.keys = sorted(table)
        if not self.keys or set(null) != set(table):
            raise ValueError(f"prompt table and null condition need the same keys, got {sorted(table)}, {sorted(null)}")
        sizes = {int(v.shape[0]) for v in table.values()}
        if len(sizes) != 1:
            raise ValueError(f"prompt table tensors must have one row per prompt, got row counts {sizes}")
        self.num_prompts = sizes.pop()
        for k in self.keys:
            self.register_buffer(f"t_{k}", table[k].detach().float().clone())
            self.register_buffer(f"n_{k}", null[k].detach().float().reshape(1, *table[k].shape[1:]).clone())

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        idx = idx.long().to(getattr(self, f"t_{self.keys[0]}").device)
        return {k: getattr(self, f"t_{k}")[idx] for k in self.keys}

    def null(self, n: int) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.keys:
            v = getattr(self, f"n_{k}")
            out[k] = v.expand(n, *v.shape[1:])
        return out


class TextToImageDistill(FDistill):
    """f-distill of a prompt-conditioned teacher; batches ``{"x": (B, *latent), "prompt": (B,) indices}``.

    Args:
        teacher: the frozen VE denoiser of the pipeline (``load_model(...).denoiser``).
        config: :class:`FDistillConfig` (``label_key`` is ``"prompt"``).
        table: the :class:`PromptTable` (embeddings computed once, see :func:`prepare`).
        time_sampling, t_range: how diffusion times are drawn (module docstring).
        student: default a teacher copy at one fixed time: flow time 1 for flow teachers (``.flow_x0``),
            else ``student_sigma`` (default ``sigma_max``).
    """

    def __init__(self, teacher: nn.Module, config: FDistillConfig | Mapping[str, Any], table: PromptTable,
                 time_sampling: str = "timestep", t_range: Sequence[float] = (0.02, 0.98),
                 student: nn.Module | None = None, fake_score: nn.Module | None = None,
                 regression_steps: int = 0) -> None:
        cfg = config if isinstance(config, FDistillConfig) else FDistillConfig.from_dict(config)
        check_time_sampling(time_sampling, t_range, teacher)
        if not isinstance(regression_steps, int) or isinstance(regression_steps, bool) or regression_steps < 0:
            raise ValueError(f"method.regression_steps must be an integer >= 0, got {regression_steps!r}")
        self.regression_steps = regression_steps
        self.table = table.eval().requires_grad_(False)
        self.time_sampling = time_sampling
        self.t_range = (float(t_range[0]), float(t_range[1]))
        self.flow = callable(getattr(teacher, "flow_x0", None))
        if student is None and self.flow:
            student = OneStepStudent(copy.deepcopy(teacher).requires_grad_(True), flow_t=1.0)
        super().__init__(teacher, cfg, student=student, fake_score=fake_score, class_conditional=True)

    def frozen(self) -> dict[str, nn.Module]:
        return {**super().frozen(), "prompts": self.table}

    def step(self, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Steps ``< regression_steps``: the student only, ``mean (G(z) - x)^2`` on teacher pairs (``batch["z"]``,
        the noise the pipeline turned into ``batch["x"]``; DMD's regression loss as a warm-up); then f-distill."""
        if step >= self.regression_steps:
            return super().step(batch, step, generator)
        if "z" not in batch:
            raise ValueError("method.regression_steps > 0 needs teacher pairs: data.real must be 'teacher'")
        x = self.student(batch["z"], self._cond(batch[self.config.label_key]))
        loss = ((x.float() - batch[self.config.data_key].float()) ** 2).mean()
        self.last_logs = {"loss_regression": float(loss.detach())}
        return {"student": loss}

    def to(self, device: str | torch.device) -> TextToImageDistill:
        super().to(device)
        self.table.to(device)
        return self

    def _cond(self, labels: torch.Tensor | None) -> dict[str, Any]:
        return {} if labels is None else self.table(labels)

    def _guide(self, d: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor,
               cond: Mapping[str, Any]) -> torch.Tensor:
        """CFG against the negative prompt: ``D_u + w (D_c - D_u)`` (``w = 1``: ``D_c``)."""
        from fastgen.samplers.guidance import guidance_combine

        w = self.config.guidance_scale
        d = d.detach()
        if w == 1.0:
            return d
        with torch.no_grad():
            d_u = self.teacher(x_t, sigma, **self.table.null(x_t.shape[0]))
        return guidance_combine(d, d_u, w)

    def sample_sigma(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """``n`` VE sigmas by ``time_sampling`` (see the module docstring)."""
        if self.time_sampling == "karras":
            return super().sample_sigma(n, generator, device)
        lo, hi = self.t_range
        gdev = generator.device if generator is not None else torch.device("cpu")
        if self.time_sampling == "flow":
            t = lo + (hi - lo) * torch.rand(n, generator=generator, device=gdev, dtype=torch.float64)
            return flow_t_to_sigma(t).float().to(device)
        table = self.teacher.table_sigmas.double().cpu()
        last = len(table) - 1
        a, b = int(round(lo * last)), int(round(hi * last))
        idx = torch.randint(a, b + 1, (n,), generator=generator, device=gdev).cpu()
        return table[idx].float().to(device)


def check_time_sampling(time_sampling: str, t_range: Sequence[float], teacher: Any) -> None:
    """``ValueError`` naming ``method.time_sampling`` / ``method.t_range`` when they do not fit the teacher."""
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"method.time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    try:
        lo, hi = (float(v) for v in t_range)
    except (TypeError, ValueError) as err:
        raise ValueError(f"method.t_range must be [lo, hi] with 0 <= lo <= hi <= 1, got {t_range!r}") from err
    if not (0 <= lo <= hi <= 1) or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"method.t_range must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(t_range)}")
    if time_sampling == "timestep" and getattr(teacher, "table_sigmas", None) is None:
        raise ValueError("method.time_sampling 'timestep' needs a Diffusers VP teacher (a training table); "
                         "use 'flow' for flow transformers or 'karras'")
    if time_sampling == "flow" and hi >= 1:
        raise ValueError("method.t_range: flow time 1 has no finite sigma; use hi < 1 (e.g. 0.98)")


# ---------------------------------------------------------------------------------------------- data


def _resolve(path: str) -> Path:
    """A relative path from the working directory, else from ``fastgen/configs/distill/`` (shipped files)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (CONFIGS_DIR / p).exists():
        return p
    return CONFIGS_DIR / p


def _check_data(opts: dict[str, Any]) -> None:
    if not opts.get("model"):
        raise ValueError("data.model is required for t2i data: the teacher pipeline (e.g. digits-sd)")
    if opts.get("prompts") in (None, "", []):
        raise ValueError("data.prompts is required: a prompt file (one prompt a line) or a list of prompts")
    if not isinstance(opts["real_per_prompt"], int) or opts["real_per_prompt"] < 1:
        raise ValueError(f"data.real_per_prompt must be an integer >= 1, got {opts['real_per_prompt']!r}")
    if not isinstance(opts["teacher_steps"], int) or opts["teacher_steps"] < 1:
        raise ValueError(f"data.teacher_steps must be an integer >= 1, got {opts['teacher_steps']!r}")
    g = opts["guidance"]
    if not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
        raise ValueError(f"data.guidance must be a finite number >= 0 (1 = no CFG), got {g!r}")
    if not isinstance(opts["real"], str) or not opts["real"]:
        raise ValueError(f"data.real must be 'teacher' or an image folder / .npz path, got {opts['real']!r}")


def prepare(model: str = "", prompts: Any = None, real: str = "teacher", real_per_prompt: int = 100,
            teacher_steps: int = 30, guidance: float = 1.0, negative_prompt: str = "",
            cache_dir: str | None = None, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """The t2i data of a config's ``data`` section, computed once (see the module docstring).

    Returns ``{"prompts": [...], "table": {key: (P, ...)}, "null": {key: (1, ...)}, "x": (N, C, H, W),
    "prompt": (N,) int64, "key": fingerprint}``.
    """
    opts = dict(model=model, prompts=prompts, real=real, real_per_prompt=real_per_prompt,
                teacher_steps=teacher_steps, guidance=guidance, negative_prompt=negative_prompt, seed=seed)
    _check_data(opts)
    texts = read_prompts(_resolve(prompts) if isinstance(prompts, str) else prompts)
    real_path = None if real == "teacher" else _resolve(real)
    images, captions = (None, None) if real_path is None else load_images(real_path)
    if captions is not None:
        texts = texts + [c for c in dict.fromkeys(captions) if c not in set(texts)]
    from fastgen.models import load_model  # distill may import models; data (prompts.py) may not
    from fastgen.models.sources import source_files_key

    key = fingerprint(str(model), texts, {k: v for k, v in opts.items() if k not in ("prompts", "model")},
                      None if images is None else [list(images.shape), float(images.double().sum())])
    if key in _PREPARED:
        return _PREPARED[key]
    cache = Path(cache_dir) if cache_dir else None
    state: dict[str, Any] = {}

    def loaded() -> Any:
        if "model" not in state:
            state["model"] = load_model(model, device)
            if state["model"].conditioning != "prompt":
                raise ValueError(f"data.model {model!r} is not a text-to-image model (conditioning: "
                                 f"{state['model'].conditioning})")
        return state["model"]

    ident = source_files_key(model)
    emb = embed_prompts(texts + [negative_prompt], lambda t: loaded().encode_prompt(t),
                        cache / f"prompts-{key}.safetensors" if cache else None, key=ident)
    table = {k: v[:-1] for k, v in emb.items()}
    null = {k: v[-1:] for k, v in emb.items()}
    if real_path is None:
        data = cached_tensors(cache / f"real-{key}.safetensors" if cache else None, fingerprint("real", key, ident),
                              lambda: _teacher_samples(loaded(), table, null, real_per_prompt, teacher_steps,
                                                       guidance, seed))
    else:
        idx = (torch.tensor([texts.index(c) for c in captions]) if captions is not None
               else torch.arange(len(images)) % len(read_prompts(_resolve(prompts) if isinstance(prompts, str)
                                                                 else prompts)))
        data = cached_tensors(cache / f"real-{key}.safetensors" if cache else None, fingerprint("enc", key, ident),
                              lambda: {"x": _encode_images(loaded(), images), "prompt": idx.long()})
    out = {"prompts": texts, "table": table, "null": null, "x": data["x"].float(), "prompt": data["prompt"].long(),
           "key": key, **({"z": data["z"].float()} if "z" in data else {})}
    _PREPARED.clear()  # keep one prepared data set per process
    _PREPARED[key] = out
    if "model" in state:  # handed to the first caller only (a teacher object is never shared by two methods)
        return {**out, "loaded": state["model"]}
    return out


def _pipeline_kwargs(cond: Mapping[str, torch.Tensor], negative: bool) -> dict[str, torch.Tensor]:
    names = {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_prompt_embeds"}
    pre = "negative_" if negative else ""
    return {pre + names[k]: v for k, v in cond.items()}


@torch.no_grad()
def _teacher_samples(model: Any, table: Mapping[str, torch.Tensor], null: Mapping[str, torch.Tensor], per_prompt: int,
                     steps: int, guidance: float, seed: int, chunk: int = 1000) -> dict[str, torch.Tensor]:
    """``per_prompt`` latents per prompt from the Diffusers pipeline itself (its default scheduler, ``steps``,
    CFG ``guidance``): rows ``prompt = r % P``; the initial noises ``z`` (``latents=``, drawn with a generator
    seeded ``seed``) are kept, so ``(z, x)`` are teacher pairs (``regression_steps``)."""
    pipe = model.info["pipeline"]
    n_prompts = next(iter(table.values())).shape[0]
    idx = torch.arange(n_prompts * per_prompt) % n_prompts
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn((len(idx), *model.shape), generator=g)
    xs = []
    for i in range(0, len(idx), chunk):
        rows = idx[i : i + chunk]
        cond = {key: v[rows] for key, v in table.items()}
        neg = {key: v.expand(len(rows), *v.shape[1:]) for key, v in null.items()}
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="latent", latents=zs[i : i + chunk])
        if "StableDiffusion3" in type(pipe).__name__:
            kw["max_sequence_length"] = int(cond["encoder_hidden_states"].shape[1])
        out = pipe(**_pipeline_kwargs(cond, False), **_pipeline_kwargs(neg, True), **kw)
        xs.append(out.images.float().cpu())
    return {"x": torch.cat(xs), "prompt": idx, "z": zs}


@torch.no_grad()
def _encode_images(model: Any, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Latents of images in [-1, 1]: the VAE posterior mean, ``(mean - shift_factor) * scaling_factor``."""
    vae = getattr(model.info["pipeline"], "vae", None)
    if vae is None:
        if tuple(images.shape[1:]) != tuple(model.shape):
            raise ValueError(f"real images have shape {tuple(images.shape[1:])}; {model.name} has no VAE and "
                             f"samples of shape {model.shape}")
        return images
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
    p = next(vae.parameters())
    out = [((vae.encode(images[i : i + chunk].to(p.device, p.dtype)).latent_dist.mean - shift) * scale).float().cpu()
           for i in range(0, len(images), chunk)]
    x = torch.cat(out)
    if tuple(x.shape[1:]) != tuple(model.shape):
        raise ValueError(f"real images encode to latents {tuple(x.shape[1:])}, the model's are {model.shape}")
    return x


def _dataset(model: str = "", prompts: Any = None, real: str = "teacher", real_per_prompt: int = 100,
             teacher_steps: int = 30, guidance: float = 1.0, negative_prompt: str = "",
             cache_dir: str | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    d = prepare(model, prompts, real, real_per_prompt, teacher_steps, guidance, negative_prompt, cache_dir, seed)
    return {k: d[k] for k in ("x", "prompt", "z") if k in d}


register_dataset("t2i", _dataset)


# ---------------------------------------------------------------------------------------------- method


def from_config(cfg: Any) -> TextToImageDistill:
    """:class:`TextToImageDistill` from a run config with ``data.name: t2i`` (module docstring).

    ``method.teacher`` defaults to ``data.model`` (and must equal it); ``method.guidance_scale`` defaults to
    ``data.guidance``; ``time_sampling`` defaults to ``flow`` for flow teachers, ``timestep`` for VP UNets.
    """
    from fastgen.models import load_model

    kw = {k: v for k, v in cfg.method.items() if k != "name"}
    data = dict(cfg.data.options)
    source = data.get("model")
    teacher_src = kw.pop("teacher", source)
    if teacher_src != source:
        raise ValueError(f"method.teacher ({teacher_src!r}) must be data.model ({source!r}) for t2i distillation")
    prepared = prepare(**data)
    model = prepared.get("loaded") or load_model(str(source))
    teacher = model.denoiser
    flow = callable(getattr(teacher, "flow_x0", None))
    time_sampling = kw.pop("time_sampling", "flow" if flow else "timestep")
    t_range = kw.pop("t_range", (0.02, 0.98))
    regression_steps = kw.pop("regression_steps", 0)
    if regression_steps and "z" not in prepared:
        raise ValueError("method.regression_steps > 0 needs teacher pairs: data.real must be 'teacher'")
    kw.pop("class_conditional", None)
    kw.setdefault("guidance_scale", float(data.get("guidance", 1.0)))
    kw.setdefault("sample_shape", tuple(model.shape))
    kw.setdefault("sigma_min", model.sigma_range[0])
    kw.setdefault("sigma_max", model.sigma_range[1])
    kw.setdefault("label_key", "prompt")
    fcfg = FDistillConfig.from_dict(kw)
    table = PromptTable(prepared["table"], prepared["null"])
    method = TextToImageDistill(teacher, fcfg, table, time_sampling=time_sampling, t_range=t_range,
                                regression_steps=regression_steps)
    from fastgen.distill.teacher import teacher_recipe

    method.student.recipe = {**teacher_recipe(model), "pipeline": str(source)}
    return method
