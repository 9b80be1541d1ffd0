"""Featurizers by conf name. Heavy modules (diffusers, the ADM UNet) are imported lazily."""

from __future__ import annotations

import importlib

from ..errors import DiftSfmError
from .base import DenseFeatures, DenseFeaturizer, Featurizer

_REGISTRY = {
    "sift": ("dift_sfm.featurizers.sift", "SIFT"),
    "sd": ("dift_sfm.featurizers.sd", "SDFeaturizer"),
    "adm": ("dift_sfm.featurizers.adm", "ADMFeaturizer"),
}


def get_featurizer(conf: dict) -> Featurizer:
    """Build the featurizer named by ``conf['name']`` with the rest of ``conf`` as settings."""
    name = conf.get("name")
    if name not in _REGISTRY:
        raise DiftSfmError(f"Unknown featurizer '{name}'. Available: {', '.join(_REGISTRY)}.")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(conf)


__all__ = ["DenseFeatures", "DenseFeaturizer", "Featurizer", "get_featurizer"]
