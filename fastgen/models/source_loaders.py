"""The file loaders behind :func:`fastgen.models.sources.load_model` (zoo, runs, students, pipelines).

Each returns a :class:`~fastgen.models.sources.LoadedModel`; callers use ``load_model``, never these.
Nothing read from a file is imported or called: networks and wrappers are registry names
(:mod:`fastgen.models.registry`), Diffusers classes are resolved by Diffusers itself from
``model_index.json`` and weights are safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fastgen.models import zoo
from fastgen.models.sources import LoadedModel, frozen

STUDENT_FORMAT = "fastgen-one-step-student"
_EDM_RANGE = {"sigma_min": 0.002, "sigma_max": 80.0}  # EDM's range: what fastgen's own models train on


def _read_json(path: Path) -> dict[str, Any]:
    from fastgen.io.files import read_json

    doc = read_json(path)  # names the file: binary bytes, syntax, top level not an object
    return doc


def _range_of(den: Any, spec: dict[str, Any] | None) -> tuple[float, float]:
    """Sigma range: the denoiser's own (EDM, VP adapters), else the spec's, else EDM's (0.002, 80)."""
    spec = spec or {}
    lo = getattr(den, "sigma_min", None)
    hi = getattr(den, "sigma_max", None)
    lo = float(lo if lo is not None else spec.get("sigma_min", _EDM_RANGE["sigma_min"]))
    hi = float(hi if hi is not None else spec.get("sigma_max", _EDM_RANGE["sigma_max"]))
    return lo, hi


def _from_info(model: Any, info: dict[str, Any], name: str, kind: str, shape: tuple[int, ...],
               extra: dict[str, Any]) -> LoadedModel:
    """A LoadedModel from a built zoo-style model and its JSON (``network``/``denoiser`` sections)."""
    from fastgen.models.onestep import OneStepStudent
    from fastgen.models.shortcut import ShortcutDenoiser

    n_cls = info.get("network", {}).get("num_classes")
    common = dict(name=name, shape=shape, num_classes=int(n_cls) if n_cls else None,
                  conditioning="class" if n_cls else "none", info=extra,
                  config={"network": info.get("network"), "denoiser": info.get("denoiser"), "shape": list(shape)})
    spec = info.get("denoiser") or {}
    if isinstance(model, OneStepStudent):
        lo, hi = _range_of(model.net, spec.get("wrap"))
        return LoadedModel(kind="student", generator=model, sigma_min=lo, sigma_max=hi, **common)
    lo, hi = _range_of(model, spec)
    if isinstance(model, ShortcutDenoiser):
        return LoadedModel(kind="shortcut", denoiser=model, shortcut=model.model, sigma_min=lo, sigma_max=hi,
                           **common)
    return LoadedModel(kind=kind, denoiser=model, sigma_min=lo, sigma_max=hi, **common)


def _shape_from_info(info: dict[str, Any], where: str) -> tuple[int, ...]:
    shape = info.get("sample_shape")
    if not shape:
        raise ValueError(f"{where} has no 'sample_shape' (the per-sample shape, e.g. [1, 8, 8])")
    return tuple(int(s) for s in shape)


def load_zoo(name: str, device: Any) -> LoadedModel:
    """A zoo model by name (``NAME.json`` declares ``sample_shape`` and, for GFT, ``method.name``)."""
    info = zoo.model_info(name)
    model = zoo.load(name, device=device)
    kind = "gft" if (info.get("method") or {}).get("name") == "gft" else "teacher"
    return _from_info(model, info, name, kind, _shape_from_info(info, f"zoo model {name!r}"),
                      {"zoo": name, "card": zoo.model_card(name)[:200]})


# ------------------------------------------------------------------------------------------ students


def is_student(path: Path) -> bool:
    """True for ``X.safetensors``/``X.json`` of a student, or a directory holding ``student.json``."""
    return _student_json(path) is not None


def _student_json(path: Path) -> Path | None:
    if path.is_dir():
        path = path / "student.json"
    elif path.suffix in (".safetensors", ".json"):
        path = path.with_suffix(".json")
    else:
        return None
    if not path.is_file():
        return None
    try:
        return path if json.loads(path.read_text()).get("format") == STUDENT_FORMAT else None
    except (OSError, ValueError, AttributeError):  # ValueError: JSON syntax or binary (UnicodeDecodeError)
        return None


def load_student_files(path: Path, device: Any, name: str) -> LoadedModel:
    """A student written by ``save_student`` (``student.json`` + ``student.safetensors``)."""
    meta = _student_json(path)
    weights = meta.with_suffix(".safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"student weights not found: {str(weights)!r} (next to {str(meta)!r})")
    info = _read_json(meta)
    model = zoo.build_model(info, weights, device=device, where=str(meta))
    loaded = _from_info(model, info, name, "student", _shape_from_info(info, str(meta)), {"student": str(meta)})
    loaded.label = meta.parent.name if meta.stem == "student" else meta.stem
    if info.get("pipeline"):  # a text-to-image student: its teacher pipeline's prompt encoder and VAE
        from fastgen.models.onestep import attach_pipeline

        attach_pipeline(loaded, info["pipeline"], meta.parent, device)
    return loaded


# ------------------------------------------------------------------------------------------ runs


def run_and_checkpoint(path: Path) -> tuple[Path, Path | None] | None:
    """``(run_dir, checkpoint_dir or None)`` for a run directory, ``RUN/checkpoints/latest`` or a
    ``RUN/checkpoints/step_*`` folder; None when ``path`` is none of these."""
    if path.is_dir() and (path / "config.yaml").is_file():
        return path, zoo.latest_checkpoint_of(path / "checkpoints")
    if path.name == "latest" and path.is_file() and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, zoo.latest_checkpoint_of(path.parent)
    if path.is_dir() and (path / "state.json").is_file() and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path
    return None


def _run_shape(cfg: dict[str, Any]) -> tuple[int, ...]:
    method, data = cfg.get("method") or {}, cfg.get("data") or {}
    if method.get("sample_shape"):
        return tuple(int(s) for s in method["sample_shape"])
    if data.get("name") == "digits":
        return (64,) if data.get("flatten") else (1, 8, 8)
    if data.get("name") == "mixture":
        opts = dict(data.get("mixture_options") or {})
        return (int(opts.get("dim", 2)),)
    raise ValueError(f"cannot tell the sample shape of a run on data {data.get('name')!r}; "
                     "set method.sample_shape in its config.yaml")


def _run_wrapper(method: dict[str, Any]) -> dict[str, Any]:
    name = method.get("name", "edm")
    if name in ("edm", "gft"):
        keys = ("sigma_data", "sigma_min", "sigma_max")
        return {"type": "edm", **{k: float(method[k]) for k in keys if k in method}}
    if name == "flow" or (name == "reflow" and int(method.get("distill_steps", 0)) == 0):
        return {"type": "flow"}  # a 2-rectified flow is a flow model: its ODE is sampled like any flow's
    if name == "reflow":
        raise ValueError(f"a reflow run with distill_steps={method['distill_steps']} is a few-step student on a "
                         "fixed t grid, not an ODE model; sample it as its card shows (the reflow docs)")
    if name == "shortcut":
        return {"type": "shortcut", "max_steps": int(method.get("max_steps", 128))}
    raise ValueError(f"runs of method {name!r} are not loadable; accepted: edm, flow, gft, shortcut, reflow "
                     "(distill_steps 0), fdistill")


def load_run(run: Path, ckpt: Path | None, device: Any, name: str) -> LoadedModel:
    """The EMA network of a training run (a checkpoint of it, or its latest)."""
    from fastgen.io.files import read_yaml

    cfg = read_yaml(run / "config.yaml", "run config")
    method = dict(cfg.get("method") or {})
    if method.get("name") == "fdistill":
        if ckpt is None or ckpt == zoo.latest_checkpoint_of(run / "checkpoints"):
            if (run / "student.json").is_file():
                return load_student_files(run / "student.json", device, name)
        raise ValueError(f"{name!r} is an f-distill run: sample its exported student ({run / 'student.safetensors'});"
                         " intermediate checkpoints of a distillation are not loadable")
    if method.get("name") == "instaflow":  # the run's exported Diffusers pipeline (fastgen.distill.instaflow)
        folder = run / "pipeline"
        latest = ckpt is None or ckpt == zoo.latest_checkpoint_of(run / "checkpoints")
        if latest and (run / "student.json").is_file():  # a one-step run written by fastgen distill: its student
            return load_student_files(run / "student.json", device, name)
        if latest and (folder / "model_index.json").is_file():
            return load_pipeline(folder, device, name)
        raise ValueError(f"{name!r} is an instaflow run: sample its exported pipeline ({folder}, written when "
                         "training ends); intermediate checkpoints of it are not loadable")
    if ckpt is None:
        raise FileNotFoundError(f"run {str(run)!r} has no checkpoint yet (checkpoints/latest is missing)")
    net_spec = dict(cfg.get("network") or {})
    info = {"network": net_spec, "denoiser": _run_wrapper(method), "sample_shape": list(_run_shape(cfg))}
    model = zoo.build_model(info, zoo.ema_state_from_checkpoint(ckpt, "net"), device=device, where=str(run))
    kind = "gft" if method.get("name") == "gft" else "teacher"
    loaded = _from_info(model, {**info, "method": method}, name, kind, tuple(info["sample_shape"]),
                        {"run": str(run), "checkpoint": str(ckpt)})
    loaded.config["method"] = method
    loaded.label = run.name
    return loaded


# ------------------------------------------------------------------------------------------ pipelines


def is_model_folder(path: Path) -> bool:
    """A pipeline folder without ``model_index.json``: ``unet/`` or ``transformer/`` + ``scheduler/``."""
    return path.is_dir() and (path / "scheduler" / "scheduler_config.json").is_file() and any(
        (path / sub / "config.json").is_file() for sub in ("unet", "transformer"))


class _Parts:
    """The components of a partial pipeline folder, as attributes (``unet`` or ``transformer``, ``scheduler``)."""

    def __init__(self, path: Path) -> None:
        import diffusers

        sub = "unet" if (path / "unet" / "config.json").is_file() else "transformer"
        cls_name = _read_json(path / sub / "config.json").get("_class_name")
        cls = getattr(diffusers, str(cls_name), None)  # a class name Diffusers exports, never a module path
        if not isinstance(cls, type) or not hasattr(cls, "from_pretrained") or not issubclass(cls, torch.nn.Module):
            raise ValueError(f"{str(path / sub)!r}: _class_name {cls_name!r} is not a Diffusers model class")
        setattr(self, sub, cls.from_pretrained(str(path), subfolder=sub, use_safetensors=True,
                                               local_files_only=True))
        if sub == "unet":
            self.transformer = None
        else:
            self.unet = None
        sched_cfg = _read_json(path / "scheduler" / "scheduler_config.json")
        self.scheduler = type("Scheduler", (), {"config": sched_cfg})()

    def set_progress_bar_config(self, **_: Any) -> None:
        pass


def _require_transformers(path: Path, index: dict[str, Any]) -> None:
    """A pipeline with transformers components (CLIP/T5 text encoders, tokenizers) needs that package: say
    which extra installs it instead of Diffusers' generic import error."""
    needs = sorted(k for k, v in index.items() if isinstance(v, list) and v and v[0] == "transformers")
    if not needs:
        return
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ValueError(f"{str(path)!r}: its components {needs} need the `transformers` package; install "
                         "it with: pip install \"fastgen-diffusion[pipelines]\"")


def load_pipeline(path: Path, device: Any, name: str) -> LoadedModel:
    """A local Diffusers pipeline folder: UNet2DModel (DDPM), SD-style UNet2DConditionModel + CLIP + VAE,
    SD3-style flow transformer, Flux (``FluxTransformer2DModel``; state: unpacked latents ``(C, H, W)``,
    :mod:`fastgen.models.flux`). Prompts are encoded with the pipeline's own ``encode_prompt``."""
    from diffusers import DiffusionPipeline

    from fastgen.core.denoiser import DiffusersFlowDenoiser, from_diffusers
    from fastgen.core.ranges import scheduler_sigma_range
    from fastgen.models.flux import FluxUnpacked, flux_latent_shape

    if not (path / "model_index.json").is_file():
        pipe = _Parts(path)
    else:
        index = _read_json(path / "model_index.json")
        # Components saved as [null, null] (e.g. SD3 without T5) must be passed as None explicitly.
        absent = {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}
        _require_transformers(path, index)
        try:
            # float32 weights (fp16 folders are upcast): fastgen's solvers run in the noise's float32/float64.
            pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, dtype=torch.float32,
                                                     **absent)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"cannot load the Diffusers pipeline folder {str(path)!r}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise ValueError(f"{str(path)!r} ({type(pipe).__name__}) has neither a unet nor a transformer")
    frozen(net, device)
    sched_cfg = dict(pipe.scheduler.config)
    c = net.config
    vae = getattr(pipe, "vae", None)
    if "Flux" in type(net).__name__:  # packed 2x2 latents: the denoiser takes them unpacked (C, H, W)
        shape = flux_latent_shape(c, getattr(vae, "config", None))
        # Dynamic shifting: the shift FluxPipeline computes for this shape's H/2 * W/2 tokens.
        kw = {"mu": _flux_mu(sched_cfg, shape[1] * shape[2] // 4)} if sched_cfg.get("use_dynamic_shifting") else {}
        lo, hi = scheduler_sigma_range(sched_cfg, **kw)
        den = DiffusersFlowDenoiser(FluxUnpacked(net), timestep_scale=1.0,  # Flux takes t in [0, 1]
                                    sigma_min=lo, sigma_max=hi)
    else:
        den = from_diffusers(net, sched_cfg)
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        shape = (int(c.in_channels), int(size), int(size))
        lo, hi = scheduler_sigma_range(sched_cfg)
    text = getattr(pipe, "text_encoder", None) is not None
    n_cls = getattr(c, "num_class_embeds", None)
    loaded = LoadedModel(
        name=name, kind="teacher", shape=shape, sigma_min=lo, sigma_max=hi,
        conditioning="prompt" if text else ("class" if n_cls else "none"), num_classes=n_cls,
        denoiser=den, config={"pipeline": type(pipe).__name__, "model": dict(c), "scheduler": sched_cfg},
        info={"pipeline": pipe, "path": str(path)}, label=path.name,
    )
    if text:
        for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, part, None) is not None:
                frozen(getattr(pipe, part), device)
        loaded.encode_prompt = _prompt_encoder(pipe, device)
    if vae is not None:
        frozen(vae, device)
        loaded.decoder = _vae_decoder(vae)
    return loaded


def _flux_mu(sched_cfg: dict[str, Any], seq_len: int) -> float:
    """FluxPipeline's dynamic-shift ``mu`` for ``seq_len`` packed image tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(calculate_shift(seq_len, sched_cfg.get("base_image_seq_len", 256),
                                 sched_cfg.get("max_image_seq_len", 4096), sched_cfg.get("base_shift", 0.5),
                                 sched_cfg.get("max_shift", 1.15)))


def _prompt_encoder(pipe: Any, device: Any):
    """``texts -> condition keywords`` of the pipeline's denoiser network (no grad, detached).

    Flux: T5 padded to ``min(512, tokenizer_2.model_max_length)`` tokens (FluxPipeline's default 512); SD3: T5
    padded to ``min(256, tokenizer_3.model_max_length)`` (StableDiffusion3Pipeline's default 256, capped by the
    tokenizer's length: the digits-sd3 pipeline was trained with 16 T5 tokens, and 256 would feed its
    transformer 240 padding tokens it never saw, at 8x the attention cost)."""
    sd3 = "StableDiffusion3" in type(pipe).__name__
    flux = "Flux" in type(pipe).__name__

    @torch.no_grad()
    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        if flux:
            tok = getattr(pipe, "tokenizer_2", None)
            n_max = min(512, int(getattr(tok, "model_max_length", 512) or 512))
            emb, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=device,
                                                num_images_per_prompt=1, max_sequence_length=n_max)
            return {"encoder_hidden_states": emb.detach(), "pooled_projections": pooled.detach()}
        if sd3:
            tok = getattr(pipe, "tokenizer_3", None)
            n_max = min(256, int(getattr(tok, "model_max_length", 256) or 256))
            emb, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=device,
                                                   num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                   max_sequence_length=n_max)
            return {"encoder_hidden_states": emb.detach(), "pooled_projections": pooled.detach()}
        emb, _ = pipe.encode_prompt(texts, device, 1, False)
        return {"encoder_hidden_states": emb.detach()}

    return encode


def _vae_decoder(vae: Any):
    """Latents -> images: ``vae.decode(z / scaling_factor + shift_factor)`` (SD: shift 0)."""
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        p = next(vae.parameters())
        out = vae.decode((z / scale + shift).to(device=p.device, dtype=p.dtype)).sample
        return out.to(z.dtype)

    return decode
