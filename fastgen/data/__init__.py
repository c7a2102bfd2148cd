"""Offline data sets: scikit-learn's bundled 8x8 digits and Gaussian-mixture families, and the registry
of training data sets by name (:mod:`fastgen.data.registry`)."""

from fastgen.data.digits import DigitsSplit, load_digits_split
from fastgen.data.registry import build_dataset, dataset_names, register_dataset
from fastgen.data.toy import GaussianMixture, grid_mixture, random_mixture, ring_mixture

__all__ = [
    "DigitsSplit",
    "load_digits_split",
    "GaussianMixture",
    "random_mixture",
    "ring_mixture",
    "grid_mixture",
    "build_dataset",
    "dataset_names",
    "register_dataset",
]
