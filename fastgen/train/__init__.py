"""Training: the accelerate :class:`Trainer`, run configs, and the methods it trains.

See ``docs/training.md``. Methods implement :class:`fastgen.train.method.Method`; configs are
:class:`fastgen.train.config.TrainConfig` (YAML in ``fastgen/configs/train/``).
"""

from fastgen.train import edm, flow, gft, reflow, shortcut  # noqa: F401  (register their methods)
from fastgen.train.config import DataConfig, EMAConfig, OptimConfig, TrainConfig, load_config
from fastgen.train.method import Method, build_method, register_method
from fastgen.train.trainer import Trainer, TrainingDiverged

__all__ = [
    "Trainer",
    "TrainingDiverged",
    "TrainConfig",
    "DataConfig",
    "OptimConfig",
    "EMAConfig",
    "load_config",
    "Method",
    "build_method",
    "register_method",
]
