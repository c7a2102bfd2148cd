"""Networks, embedded models and the one door for loading any model.

- :func:`load_model` (:mod:`fastgen.models.sources`): a zoo name, training run or checkpoint, exported
  student, local Diffusers pipeline folder or mixture spec -> :class:`LoadedModel` (denoiser or
  one-step generator, kind, shape, sigma range, conditioning, decode, identity).
- :mod:`fastgen.models.registry`: networks and denoiser wrappers by name.
- :mod:`fastgen.models.nets`: ``build_network("mlp" | "unet", ...)``, :class:`ResidualMLP`,
  :class:`DigitsUNet`.
- :mod:`fastgen.models.zoo`: ``load(name)`` returns the bare module from ``fastgen/models/weights/``
  (``NAME.safetensors`` + ``NAME.json`` + ``NAME.md``); ``list_models()``, ``model_card(name)``.
"""

from fastgen.models.nets import DigitsUNet, ResidualMLP, build_network
from fastgen.models.sources import LoadedModel, load_model
from fastgen.models.zoo import export_model, list_models, load, load_network, model_card, model_info

__all__ = [
    "load_model",
    "LoadedModel",
    "load",
    "load_network",
    "list_models",
    "model_card",
    "model_info",
    "export_model",
    "build_network",
    "ResidualMLP",
    "DigitsUNet",
]
