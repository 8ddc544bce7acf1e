"""Data layer: load MedMNIST files or image folders into one validated `Dataset` layout."""

from .dataset import SPLITS, Dataset
from .errors import DatasetError
from .folder import load_image_folder
from .medmnist import OFFICIAL_MD5, candidate_dirs, load_medmnist, resolve_medmnist

__all__ = [
    "SPLITS",
    "Dataset",
    "DatasetError",
    "OFFICIAL_MD5",
    "candidate_dirs",
    "load_image_folder",
    "load_medmnist",
    "resolve_medmnist",
]
