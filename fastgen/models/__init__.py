"""Networks and embedded models.

- :mod:`fastgen.models.nets`: ``build_network("mlp" | "unet", ...)``, :class:`ResidualMLP`,
  :class:`DigitsUNet`.
- :mod:`fastgen.models.zoo`: ``load(name)`` returns a ready denoiser from ``fastgen/models/weights/``
  (``NAME.safetensors`` + ``NAME.json`` + ``NAME.md``); ``list_models()``, ``model_card(name)``.
"""

from fastgen.models.nets import DigitsUNet, ResidualMLP, build_network
from fastgen.models.zoo import export_model, list_models, load, load_network, model_card, model_info

__all__ = [
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
