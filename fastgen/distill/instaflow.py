"""InstaFlow (Liu, Zhang, Ma, Peng, Liu, ICLR 2024): text-conditioned reflow of a Diffusers pipeline, then one step.

Method ``instaflow`` on the shared Trainer (``fastgen distill NAME``, or ``fastgen train CONFIG.yaml``); each
run ends in a Diffusers pipeline
folder ``<output_dir>/pipeline/`` that ``DiffusionPipeline.from_pretrained``, :func:`fastgen.models.load_model`
and ``fastgen sample --model`` load (the run folder itself loads as that pipeline too):

1. **2-rectified flow** (``distill_steps: 0``): couplings ``(z0, z1)`` of the teacher pipeline's CFG-guided
   probability-flow ODE (``guidance`` against ``negative_prompt``; prompt ``i % P`` of ``prompts``, whose
   embeddings are computed once into a :class:`fastgen.distill.t2i.PromptTable`), drawn by a fastgen solver
   (:func:`fastgen.train.reflow_pairs.generate_pairs`: VE start ``sigma_max z0``, ``z1`` the ODE endpoint at
   sigma 0, latents); the network is refit on them by the reflow loss (:func:`fastgen.train.reflow.reflow_loss`).
   CFG is baked into the coupling: sample the result at guidance 1.
2. **One-step distillation** (``distill_steps: 1``, ``teacher: <run 1>/pipeline``, ``guidance: 1``): fresh pairs
   of the straightened flow and ``t`` fixed at the start (the paper's "fix t = 0" stage with its L2 loss; LPIPS
   is not available offline). The result is valid for one Euler step only (reflow card, pitfall 4), and is
   also written as a fastgen one-step student (:meth:`InstaFlowMethod.one_step_student`: that Euler step is
   ``D(sigma_max z, sigma_max)`` exactly). ``fastgen distill`` chains the stages: a one-step config's
   ``method.stage1`` names the 2-RF config, trained first when its pipeline folder is absent.

**Parametrisation (differs from the paper, on purpose).** InstaFlow re-purposes SD's epsilon UNet as a
velocity network (its output changes meaning). Here the trainable network stays the pipeline's own (``unet``
with its ``prediction_type``, or the flow ``transformer``): the rectified-flow velocity is *derived* from the
pipeline's VE denoiser ``D`` (:func:`fastgen.core.denoiser.rf_velocity`, ``v = (D(x_t/t, (1-t)/t) - x_t)/(1-t)``)
and the loss is back-propagated through that map into the network's weights. The initial network is exactly
the teacher, and the result is a drop-in for the user's pipeline class with the same config, size and
loaders; first-order schedulers (Euler, DDIM) step it exactly as rectified-flow Euler does.

**Times.** The teacher is defined for VE sigma in ``[sigma_min, sigma_max]`` (a VP UNet: its training table,
e.g. [0.029, 14.6] for digits-sd). The straight path starts at the sampler's start ``x = sigma_max z0``:
``start_t = eps = 1 / (1 + sigma_max)`` (:func:`reflow_loss`; the RF code's path from ``t = 0`` would leak
``eps z1`` of the answer into the first input when ``sigma_max`` is small), and training times stop at
``end_t = 1 / (1 + sigma_min)``. The exported VP pipeline's scheduler is ``EulerDiscreteScheduler`` with
``timestep_spacing="trailing"`` (its single step goes from timestep T-1 to 0; DDIM's "leading" 1-step grid
would start at timestep 1); flow pipelines keep their ``FlowMatchEulerDiscreteScheduler``.

Config (``data: {name: none, num_samples: num_pairs}``; the ``network`` section is unused)::

    method: {name: instaflow, teacher: digits-sd, prompts: prompts/digits.txt, guidance: 1.5,
             negative_prompt: "", num_pairs: 8000, pair_solver: heun, pair_steps: 16, pair_schedule: karras,
             pair_seed: 0, pair_batch_size: 1000, distill_steps: 0, loss: l2}
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgen.core.denoiser import rf_velocity
from fastgen.distill.t2i import PromptTable
from fastgen.models.onestep import OneStepStudent
from fastgen.train.reflow import ReflowMethod, check_options, check_pair_spec

__all__ = ["PipelineVelocity", "InstaFlowMethod", "export_pipeline", "from_config", "PIPELINE_DIR"]

#: The run's exported pipeline folder (relative to ``output_dir``).
PIPELINE_DIR = "pipeline"
_PAIR_KEYS = {"num_pairs": 8000, "pair_solver": "heun", "pair_steps": 16, "pair_schedule": "karras",
              "pair_seed": 0, "pair_batch_size": 1000}
_OPTIONS = ("distill_steps", "loss")


class PipelineVelocity(nn.Module):
    """``v(x_t, t, **cond)``: the rectified-flow velocity of a (trainable) VE denoiser of a pipeline.

    ``x_t`` (B, C, H, W) rectified-flow state, ``t`` (B,) rectified-flow time in (0, 1) (0 noise, 1 data);
    ``cond`` the denoiser's keywords (``encoder_hidden_states``, ``pooled_projections``). ``denoiser.model``
    is the Diffusers network whose weights train."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    @property
    def model(self) -> nn.Module:
        return self.denoiser.model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return rf_velocity(self.denoiser, x_t, t, **cond)


class InstaFlowMethod(ReflowMethod):
    """Reflow / k-step distillation of a pipeline's network on prompt-conditioned couplings.

    Args:
        net: :class:`PipelineVelocity` of a trainable copy of the teacher's denoiser.
        pairs: ``{"z0", "z1": (N, C, H, W), "label": (N,) prompt indices}``.
        table: the prompts' embeddings (row = ``label``); frozen.
        teacher_path: the teacher pipeline folder (copied by :meth:`export`).
        distill_steps, loss: as :class:`~fastgen.train.reflow.ReflowMethod`.
        sigma_range: the teacher's VE ``(sigma_min, sigma_max)``: ``eps = start_t = 1/(1 + sigma_max)``,
            ``end_t = 1/(1 + sigma_min)``.
        card: lines for the exported pipeline's README (teacher, guidance, pairs).
        recipe: the student recipe (:func:`fastgen.distill.teacher.teacher_recipe` of the teacher, plus
            ``"pipeline"``: the load_model source whose tokenizer, text encoders and VAE the exported one-step
            student uses); needed by :meth:`one_step_student` only.
        sample_shape: per-sample latent shape ``(C, H, W)`` (the one-step student's ``z``).
    """

    def __init__(self, net: PipelineVelocity, pairs: Mapping[str, torch.Tensor], table: PromptTable,
                 teacher_path: str | Path, sigma_range: tuple[float, float], distill_steps: int = 0,
                 loss: str = "l2", card: list[str] | None = None, recipe: Mapping[str, Any] | None = None,
                 sample_shape: tuple[int, ...] = ()) -> None:
        lo, hi = (float(v) for v in sigma_range)
        a, end = 1.0 / (1.0 + hi), 1.0 / (1.0 + lo)
        if "label" not in pairs:
            raise ValueError("instaflow pairs need 'label' (the prompt index of each pair)")
        super().__init__(net, pairs, distill_steps=distill_steps, eps=a, loss=loss, num_classes=0,
                         start_t=a, end_t=end)
        self.table = table.eval().requires_grad_(False)
        self.teacher_path = Path(teacher_path)
        self.card = list(card or [])
        self.sigma_max = hi
        self.recipe = dict(recipe) if recipe is not None else None
        self.sample_shape = tuple(int(s) for s in sample_shape)

    def frozen(self) -> dict[str, nn.Module]:
        return {"prompts": self.table}

    def condition(self, idx: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        """The prompt embeddings of pair rows ``idx`` (no dropout: CFG is in the coupling)."""
        return self.table(self.pairs["label"][idx])

    def sampling_denoiser(self, net: nn.Module | None = None) -> nn.Module:
        """The VE denoiser (EDM contract) of ``net`` (e.g. the EMA copy) or the training net."""
        return (net if net is not None else self.net).denoiser

    def one_step_student(self, net: PipelineVelocity) -> OneStepStudent:
        """The one-step run (``distill_steps == 1``) as a fastgen one-step student: ``x = D(sigma_max z,
        sigma_max)`` with ``net``'s VE denoiser (a copy).

        This is the single rectified-flow Euler step exactly: from ``x_a = (1 - a) z`` at ``a = 1/(1 +
        sigma_max)``, ``x_1 = x_a + (1 - a) v(x_a, a)`` and ``v = (D(x_a / a, (1 - a)/a) - x_a)/(1 - a)``
        give ``x_1 = D(sigma_max z, sigma_max)``, the same call an f-distill text-to-image student makes, so
        it saves, loads and samples as one (``student.json``, :class:`fastgen.distill.OneStepPipeline`)."""
        if self.distill_steps != 1:
            raise ValueError(f"a one-step student needs an instaflow run with distill_steps: 1, this run has "
                             f"distill_steps: {self.distill_steps} (sample it as a pipeline instead)")
        if self.recipe is None:
            raise ValueError("this InstaFlowMethod has no student recipe (build it with from_config)")
        den = copy.deepcopy(net.denoiser).eval().requires_grad_(False)
        return OneStepStudent(den, sigma=self.sigma_max, recipe=self.recipe)

    def export(self, net: nn.Module, folder: str | Path) -> Path:
        """Write ``folder``: the teacher's pipeline folder with ``net``'s network (see :func:`export_pipeline`)."""
        k = self.distill_steps
        what = "2-rectified flow (reflow)" if k == 0 else f"{k}-step distillation (valid for {k} Euler step(s) only)"
        return export_pipeline(net.model, self.teacher_path, folder, [*self.card, f"- trained network: {what}"])


def _tensor_dtype(folder: Path) -> torch.dtype:
    """The floating dtype of the first tensor in ``folder``'s ``*.safetensors`` (float32 if none)."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_slice(k)
                dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(t.get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


def export_pipeline(model: nn.Module, teacher_path: str | Path, folder: str | Path, card: list[str] | None = None
                    ) -> Path:
    """A Diffusers pipeline folder: ``teacher_path``'s files with ``model`` as its ``unet``/``transformer``.

    The network is saved (safetensors) in the dtype the teacher's network was stored in; a VP teacher's
    scheduler becomes ``EulerDiscreteScheduler(timestep_spacing="trailing")`` (module docstring). The folder is
    written under a temporary name and renamed into place; an existing ``folder`` is replaced.
    """
    src, out = Path(teacher_path), Path(folder)
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"teacher pipeline folder without model_index.json: {str(src)!r}")
    sub = "unet" if (src / "unet" / "config.json").is_file() else "transformer"
    if not (src / sub / "config.json").is_file():
        raise ValueError(f"{str(src)!r} has neither unet/ nor transformer/ with a config.json")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("README.md", "build_info.json", sub))
    copy.deepcopy(model).to(_tensor_dtype(src / sub)).save_pretrained(tmp / sub, safe_serialization=True)
    index = json.loads((src / "model_index.json").read_text())
    sched_cfg = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    if "FlowMatch" not in str(sched_cfg.get("_class_name", "")):
        from diffusers import EulerDiscreteScheduler

        shutil.rmtree(tmp / "scheduler")
        EulerDiscreteScheduler.from_config(sched_cfg, timestep_spacing="trailing").save_pretrained(tmp / "scheduler")
        index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    lines = [f"# {out.parent.name if out.name == PIPELINE_DIR else out.name}: InstaFlow-style rectified flow of "
             f"{src.name} (fastgen)", "",
             "Written by fastgen's `instaflow` method (`fastgen/distill/instaflow.py`): the teacher pipeline's "
             "files with its network fine-tuned on (noise, CFG-guided ODE endpoint) couplings.", "",
             *(card or []), "",
             "Sample with guidance_scale=1.0 (CFG is baked into the coupling) and few Euler steps; a one-step "
             "distilled network is valid at num_inference_steps=1 only."]
    (tmp / "README.md").write_text("\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _check_guidance(w: Any) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"method.guidance must be a finite number >= 0 (1 = no CFG), got {w!r}")
    return float(w)


def from_config(cfg: Any) -> InstaFlowMethod:
    """Factory for ``method: {name: instaflow, teacher, base_pipeline, prompts, guidance, negative_prompt,
    num_pairs, pair_solver, pair_steps, pair_schedule, pair_seed, pair_batch_size, distill_steps, loss}`` (module
    docstring). ``base_pipeline`` (default ``teacher``): the pipeline whose tokenizer, text encoders and VAE the
    one-step student names (``fastgen distill`` sets it to stage 1's teacher when ``stage1`` is given)."""
    from fastgen.data.prompts import embed_prompts, read_prompts
    from fastgen.distill.t2i import _resolve
    from fastgen.models import load_model
    from fastgen.models.sources import source_files_key
    from fastgen.samplers.guidance import CFGDenoiser
    from fastgen.train.method import method_kwargs
    from fastgen.train.reflow import _pairs_for

    kw = method_kwargs(cfg)
    source = kw.pop("teacher", None)
    if not isinstance(source, str) or not source:
        raise ValueError("method.teacher must name the text-to-image pipeline whose ODE gives the couplings "
                         "(e.g. digits-sd, a pipeline folder, or <instaflow run>/pipeline)")
    prompts = kw.pop("prompts", None)
    if prompts in (None, "", []):
        raise ValueError("method.prompts is required: a prompt file (one prompt a line) or a list of prompts")
    guidance = _check_guidance(kw.pop("guidance", 1.0))
    base = kw.pop("base_pipeline", source)
    if not isinstance(base, str) or not base:
        raise ValueError(f"method.base_pipeline must name a text-to-image pipeline (load_model source), got {base!r}")
    negative = kw.pop("negative_prompt", "")
    if not isinstance(negative, str):
        raise ValueError(f"method.negative_prompt must be a string, got {negative!r}")
    spec: dict[str, Any] = {k: kw.pop(k, d) for k, d in _PAIR_KEYS.items()}
    unknown = sorted(set(kw) - set(_OPTIONS))
    if unknown:
        accepted = ["teacher", "base_pipeline", "prompts", "guidance", "negative_prompt", *_PAIR_KEYS, *_OPTIONS]
        raise ValueError(f"unknown instaflow method option(s) {unknown}; accepted: {accepted}")
    check_options(**kw)
    check_pair_spec(cfg, spec, "instaflow")
    texts = read_prompts(_resolve(prompts) if isinstance(prompts, str) else prompts)
    loaded = load_model(source)
    if loaded.conditioning != "prompt" or loaded.denoiser is None or "path" not in loaded.info:
        raise ValueError(f"method.teacher {source!r} is not a text-to-image pipeline folder (conditioning "
                         f"{loaded.conditioning!r}, kind {loaded.kind!r}); instaflow needs one (e.g. digits-sd)")
    emb = embed_prompts(texts + [negative], loaded.encode_prompt)
    table = PromptTable({k: v[:-1] for k, v in emb.items()}, {k: v[-1:] for k, v in emb.items()})
    guided = CFGDenoiser(loaded.denoiser, guidance, uncond=table.null(1))
    # the identity fingerprints config + sigma range only: the weights' files (sizes, mtimes) are in the spec too,
    # so pairs cached for a teacher folder that was since retrained (a stage-1 run) are regenerated, not reused
    spec.update(pair_sigma_max=loaded.sigma_max, pair_classes=len(texts), teacher=loaded.identity(),
                teacher_files=source_files_key(source), prompts=texts, guidance=guidance, negative_prompt=negative)
    pairs = _pairs_for(cfg, spec, loaded, guided, lambda rows: table(rows))
    student = copy.deepcopy(loaded.denoiser).train()
    student.model.requires_grad_(True)
    card = [f"- teacher: `{source}` (identity {loaded.identity()['fingerprint'][:12]}), CFG {guidance} against "
            f"{negative!r}, {len(texts)} prompts",
            f"- couplings: {spec['num_pairs']} pairs, {spec['pair_solver']} {spec['pair_steps']} steps "
            f"({spec['pair_schedule']}), VE sigma {loaded.sigma_max:.4g} -> 0, seed {spec['pair_seed']}",
            f"- training: {cfg.steps} steps, batch {cfg.batch_size}, loss {kw.get('loss', 'l2')}, seed {cfg.seed}"]
    from fastgen.distill.teacher import teacher_recipe

    recipe = {**teacher_recipe(loaded), "pipeline": base}
    return InstaFlowMethod(PipelineVelocity(student), pairs, table, loaded.info["path"], loaded.sigma_range,
                           card=card, recipe=recipe, sample_shape=tuple(loaded.shape), **kw)
