"""Compatibility module: the names that lived here before the split, re-exported lazily.

- :mod:`dift_sfm.colmap.database`: database creation and the transactional import
  (``create_database``, ``import_into_database``, ``ImportStats``, ``DatabaseError``, ...);
- :mod:`dift_sfm.colmap.mapping`: verification, incremental mapping, the model summary
  (``verify_database``, ``run_mapping``, ``summarize_model``, ``ReconstructionSummary``);
- :mod:`dift_sfm.sfm`: the whole pipeline (``run_pipeline``, ``reconstruct``, ``make_pairs``).

``CAMERA_MODES`` comes from :mod:`dift_sfm.colmap` without loading pycolmap; every other name is
imported on first access. Import from the modules above in new code.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .colmap import CAMERA_MODES  # noqa: F401 (re-exported)

_MOVED = {
    "dift_sfm.colmap.database": (
        "CAMERA_MODELS", "COLMAP_TABLES", "DatabaseError", "DatabaseLockedError", "ImportStats",
        "check_image_names", "create_database", "import_into_database"),
    "dift_sfm.colmap.mapping": (
        "ReconstructionError", "ReconstructionSummary", "run_mapping", "verify_database"),
    "dift_sfm.sfm": ("PAIR_STRATEGIES", "make_pairs", "reconstruct", "run_pipeline"),
}
_WHERE = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str) -> Any:
    if name == "summarize":  # renamed
        return import_module("dift_sfm.colmap.mapping").summarize_model
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
