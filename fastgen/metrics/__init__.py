"""Evaluation: Frechet distances (FID, FD_digits), IS, KID, precision/recall and reference statistics.

Importing this package is light: no Inception network is built until a function needs one.
"""

from fastgen.metrics.digits import digits_fd, digits_features, digits_logits
from fastgen.metrics.stats import FeatureStatistics, frechet_distance

__all__ = [
    "FeatureStatistics",
    "frechet_distance",
    "digits_fd",
    "digits_features",
    "digits_logits",
]
