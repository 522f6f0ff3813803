"""Datasets: each module registers its datasets by name on import."""

from kdrun.data import digits, imagefolder, torchvision_sets  # noqa: F401  (registers)
from kdrun.data.base import DATASETS, DataBundle, FileSet, ImageSet, register_dataset  # noqa: F401
