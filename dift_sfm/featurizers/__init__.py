"""Featurizers by conf name. Heavy modules (diffusers, transformers) are imported lazily: importing
a featurizer module only defines its class and ``default_conf``."""

from __future__ import annotations

import copy
import importlib
from typing import Any

from ..errors import DiftSfmError
from .base import DenseFeatures, DenseFeaturizer, Featurizer

_REGISTRY = {
    "sift": ("dift_sfm.featurizers.sift", "SIFT"),
    "sd": ("dift_sfm.featurizers.sd", "SDFeaturizer"),
    "adm": ("dift_sfm.featurizers.adm", "ADMFeaturizer"),
}


def featurizer_class(name: str | None) -> type[Featurizer]:
    """The featurizer class registered as ``name``; DiftSfmError listing the names otherwise."""
    if name not in _REGISTRY:
        raise DiftSfmError(f"Unknown featurizer '{name}'. Available: {', '.join(_REGISTRY)}.")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def featurizer_defaults(name: str | None) -> dict[str, Any]:
    """A deep copy of the ``default_conf`` of featurizer ``name`` (every key it accepts)."""
    return copy.deepcopy(featurizer_class(name).default_conf)


def get_featurizer(conf: dict) -> Featurizer:
    """Build the featurizer named by ``conf['name']`` with the rest of ``conf`` as settings."""
    return featurizer_class(conf.get("name"))(conf)


__all__ = ["DenseFeatures", "DenseFeaturizer", "Featurizer", "featurizer_class",
           "featurizer_defaults", "get_featurizer"]
