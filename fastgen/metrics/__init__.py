"""Evaluation: Frechet distances (FID, FD_digits), IS, KID, precision/recall and reference statistics.

Importing this package is light: no Inception network is built (or weight file read) until a
function needs one.
"""

from fastgen.metrics.compute import (
    FeatureSet,
    FrechetDistance,
    compute_reference_stats,
    evaluate,
    extract_features,
    fid,
    fid_from_stats,
    inception_score,
    kid,
    precision_recall,
)
from fastgen.metrics.coverage import class_diversity, fd_to_teacher, knn_precision_recall, mean_ci
from fastgen.metrics.digits import digits_fd, digits_features, digits_logits
from fastgen.metrics.features import (
    DigitsExtractor,
    FeatureExtractor,
    InceptionExtractor,
    ModuleExtractor,
    get_extractor,
    images_to_uint8,
)
from fastgen.metrics.inception import FIDInceptionV3, load_inception, resolve_inception_weights
from fastgen.metrics.io import ReferenceStats, load_stats, save_stats
from fastgen.metrics.stats import FeatureStatistics, frechet_distance

__all__ = [
    "FeatureStatistics",
    "frechet_distance",
    "knn_precision_recall",
    "fd_to_teacher",
    "class_diversity",
    "mean_ci",
    "digits_fd",
    "digits_features",
    "digits_logits",
    "FeatureExtractor",
    "InceptionExtractor",
    "DigitsExtractor",
    "ModuleExtractor",
    "get_extractor",
    "images_to_uint8",
    "FeatureSet",
    "FrechetDistance",
    "extract_features",
    "compute_reference_stats",
    "evaluate",
    "fid",
    "fid_from_stats",
    "inception_score",
    "kid",
    "precision_recall",
    "FIDInceptionV3",
    "load_inception",
    "resolve_inception_weights",
    "ReferenceStats",
    "load_stats",
    "save_stats",
]
