"""A one-step pipeline with Diffusers conventions around a one-step student.

``OneStepPipeline.from_pretrained(SOURCE)`` opens any student :func:`fastgen.models.load_model` serves (an
exported ``student.safetensors`` or its folder, a zoo student such as ``digits-fdistill-js``, a distill run);
``pipe.save_pretrained(FOLDER)`` writes ``FOLDER/student.safetensors`` + ``student.json``. A call

    pipe(batch_size=None, prompt=None, negative_prompt=None, num_images_per_prompt=1, class_labels=None,
         generator=None, output_type="pil", return_dict=True)

draws ``z ~ N(0, I)`` from ``generator`` (one network call) and returns ``images`` as a list of PIL images
(``"pil"``, the Diffusers default), a ``(B, H, W, C)`` array in [0, 1] (``"np"``) or a ``(B, C, H, W)``
tensor in [-1, 1] (``"pt"``). The batch is ``len(prompt) * num_images_per_prompt`` for text students, else
``batch_size * num_images_per_prompt`` (``batch_size`` defaults to 1 or to the number of class labels).
Keywords a one-step student does not take (``num_inference_steps``, ``guidance_scale``, ...) are refused
by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["OneStepPipeline", "OneStepPipelineOutput", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class OneStepPipelineOutput:
    """``images``: PIL images (``"pil"``), a ``(B, H, W, C)`` float array in [0, 1] (``"np"``) or a
    ``(B, C, H, W)`` tensor in [-1, 1] (``"pt"``; non-image samples keep their own shape)."""

    images: Any


class OneStepPipeline:
    """A one-step Diffusers-style pipeline.

    Args:
        student: the generator ``student(z, cond) -> x`` (:class:`~fastgen.models.onestep.OneStepStudent`).
        sample_shape: per-sample shape of ``z``, e.g. ``(1, 8, 8)``.
        value_range: the data range of the samples, mapped to [0, 1] for ``"np"``/``"pil"``.
        num_classes: class-conditional students: the number of classes (labels are checked), else None.
        encode_prompt: text students: ``texts -> condition keywords`` (detached), else None.
        decoder: latent students: ``latents -> images in [-1, 1]``, else None.
        metadata: JSON-able extras written by :meth:`save_pretrained`.
    """

    def __init__(self, student: Any, sample_shape: tuple[int, ...], value_range: tuple[float, float] = (-1.0, 1.0),
                 num_classes: int | None = None, encode_prompt: Any = None, decoder: Any = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self.student = student
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.value_range = value_range
        self.num_classes = num_classes
        self.encode_prompt = encode_prompt
        self.decoder = decoder
        self.metadata = dict(metadata or {})

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device = "cpu") -> OneStepPipeline:
        """Open a student by any :func:`fastgen.models.load_model` source; ``ValueError`` for non-students."""
        from fastgen.models import load_model

        model = load_model(source, device)
        if model.kind != "student":
            raise ValueError(f"OneStepPipeline.from_pretrained: {str(source)!r} is a {model.kind} model, not a "
                             "one-step student")
        student = model.generator
        if getattr(student, "recipe", None) is not None and not student.recipe.get("network"):
            student.recipe = {**student.recipe, "network": model.config.get("network")}  # for save_pretrained
        pipeline = (model.config.get("pipeline") or {}).get("source") if model.conditioning == "prompt" else None
        if pipeline and getattr(student, "recipe", None) is not None:
            student.recipe = {**student.recipe, "pipeline": pipeline}  # text students keep their encoder/VAE
        return cls(student, model.shape, num_classes=model.num_classes, encode_prompt=model.encode_prompt,
                   decoder=model.decoder, metadata={"identity": model.identity()})

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``folder/student.safetensors`` + ``student.json`` (what :meth:`from_pretrained` reads)."""
        from fastgen.distill.student import save_student

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights, _ = save_student(self.student, folder / "student", self.sample_shape, self.metadata)
        return weights

    @property
    def device(self) -> torch.device:
        p = next(self.student.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> OneStepPipeline:
        self.student.to(device)
        return self

    def _cond(self, n: int, k: int, prompt: Any, negative_prompt: Any, class_labels: Any) -> dict[str, Any]:
        if negative_prompt is not None:
            raise ValueError("negative_prompt does not apply to a one-step student (no guidance pass)")
        if prompt is not None:
            if self.encode_prompt is None:
                raise ValueError("prompt does not apply: this student is not a text-to-image model")
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            with torch.no_grad():
                cond = self.encode_prompt([t for t in texts for _ in range(k)])
            return {key: v.detach().to(self.device) for key, v in cond.items()}
        if self.encode_prompt is not None:
            raise ValueError("this student is text-to-image: pass prompt=...")
        if class_labels is None:
            return {}
        if self.num_classes is None and self.metadata.get("identity") is not None:
            raise ValueError("class_labels do not apply: this student is unconditional")
        labels = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(n // k)
        labels = labels.repeat_interleave(k)
        if labels.numel() != n:
            raise ValueError(f"class_labels must have 1 or batch_size={n // k} entries, got {labels.numel() // k}")
        if self.num_classes is not None and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"class_labels must be in [0, {self.num_classes})")
        return {"class_labels": labels}

    @torch.no_grad()
    def __call__(self, batch_size: int | None = None, prompt: str | list[str] | None = None,
                 negative_prompt: str | None = None, num_images_per_prompt: int = 1,
                 class_labels: torch.Tensor | list[int] | int | None = None, generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True, **kwargs: Any) -> Any:
        if kwargs:
            raise ValueError(f"OneStepPipeline does not take {sorted(kwargs)}; accepted: batch_size, prompt, "
                             "negative_prompt, num_images_per_prompt, class_labels, generator, output_type, "
                             "return_dict")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if prompt is not None:
            base = 1 if isinstance(prompt, str) else len(prompt)
        elif batch_size is not None:
            base = batch_size
        else:
            base = 1 if class_labels is None else max(torch.as_tensor(class_labels).numel(), 1)
        if not isinstance(base, int) or base < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if prompt is not None and batch_size not in (None, base):
            raise ValueError(f"batch_size={batch_size} does not match the {base} prompt(s)")
        n = base * num_images_per_prompt
        cond = self._cond(n, num_images_per_prompt, prompt, negative_prompt, class_labels)
        gdev = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn((n, *self.sample_shape), generator=generator, device=gdev).to(self.device)
        x = self.student(z, cond)
        if self.decoder is not None:
            x = self.decoder(x).clamp(-1, 1)
        images = _convert(x, output_type, self.value_range if self.decoder is None else (-1.0, 1.0))
        return OneStepPipelineOutput(images) if return_dict else (images,)


def _convert(x: torch.Tensor, output_type: str, value_range: tuple[float, float]) -> Any:
    if output_type == "pt":
        return x
    lo, hi = value_range
    img = ((x.float() - lo) / (hi - lo)).clamp(0, 1).cpu()
    arr = img.permute(0, 2, 3, 1).numpy() if img.ndim == 4 else img.numpy()
    if output_type == "np":
        return arr
    if arr.ndim != 4:
        raise ValueError(f"output_type='pil' needs image samples (C, H, W); these have shape {tuple(x.shape[1:])}")
    from PIL import Image

    return [Image.fromarray((a[..., 0] if a.shape[-1] == 1 else a).__mul__(255).round().astype("uint8"))
            for a in arr]
