"""Feature layer: frozen backbones, cached extraction and bounded-norm feature scaling."""

from .backbones import (
    BACKBONES,
    RANDOM,
    Backbone,
    BackboneError,
    BackboneInfo,
    load_backbone,
)
from .extract import DEFAULT_CACHE_DIR, FeatureSet, available_cores, extract_features
from .preprocess import FeatureScaler

__all__ = [
    "BACKBONES",
    "DEFAULT_CACHE_DIR",
    "RANDOM",
    "Backbone",
    "BackboneError",
    "BackboneInfo",
    "FeatureScaler",
    "FeatureSet",
    "available_cores",
    "extract_features",
    "load_backbone",
]
