"""COLMAP access through pycolmap: the database (:mod:`.database`) and mapping (:mod:`.mapping`).

This file imports nothing heavy: the command line reads the option names below without
loading pycolmap. Import the submodules for the functions.
"""

#: ``camera_mode`` values of :func:`dift_sfm.colmap.database.create_database`: which images share
#: intrinsics (``auto``: consecutive images of the same size, EXIF camera and focal length).
CAMERA_MODES = ("auto", "single", "per-folder", "per-image")
DEFAULT_CAMERA_MODE = "auto"
#: COLMAP camera model of the cameras dift-sfm creates (one focal, principal point, one radial)
DEFAULT_CAMERA_MODEL = "SIMPLE_RADIAL"

#: ``mapper`` values of :func:`dift_sfm.colmap.mapping.run_mapping` (when to use which:
#: docs/reconstruction.md); the first is the default.
MAPPERS = ("incremental", "global", "hierarchical")
