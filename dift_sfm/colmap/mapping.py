"""COLMAP on a database holding keypoints and raw matches: verification, mapping (incremental,
global or hierarchical), and the figures of the resulting model.

    database.db ─► pycolmap geometric verification (two_view_geometries) ─► mapping
    ─► sfm_dir/sparse/0 (largest model, COLMAP binary), sparse/1, ... (smaller ones, if any)

Mappers (``dift_sfm.colmap.MAPPERS``; when to use which: docs/reconstruction.md):
    incremental   ``pycolmap.incremental_mapping`` (COLMAP's mapper; the default)
    global        ``pycolmap.global_mapping`` (GLOMAP: rotation averaging, global positioning)
    hierarchical  ``pycolmap.hierarchical_mapping`` (incremental in overlapping clusters, merged)
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycolmap

from ..errors import DiftSfmError
from . import MAPPERS

logger = logging.getLogger("dift_sfm")


class ReconstructionError(DiftSfmError):
    """Geometric verification or mapping produced no usable model."""


#: mapper name (``MAPPERS``) -> (pycolmap function name, its options class name)
PYCOLMAP_MAPPERS: dict[str, tuple[str, str]] = {
    "incremental": ("incremental_mapping", "IncrementalPipelineOptions"),
    "global": ("global_mapping", "GlobalPipelineOptions"),
    "hierarchical": ("hierarchical_mapping", "HierarchicalPipelineOptions"),
}
DEFAULT_MAPPER = MAPPERS[0]
#: COLMAP's default fewest registered images of a kept model (capped at the image count)
DEFAULT_MIN_MODEL_SIZE = 10


def check_mapper(mapper: str) -> str:
    """``mapper`` if it names one of ``MAPPERS``, else a DiftSfmError listing them."""
    if mapper not in MAPPERS:
        raise DiftSfmError(f"Unknown mapper '{mapper}': use one of {', '.join(MAPPERS)}.")
    return mapper


def mapper_options(mapper: str, num_images: int, min_model_size: int | None = None) -> Any:
    """pycolmap options of ``mapper`` with dift-sfm's defaults: random seed 0 everywhere, and
    ``min_model_size`` (default COLMAP's 10 capped at ``num_images``)."""
    options = getattr(pycolmap, PYCOLMAP_MAPPERS[check_mapper(mapper)][1])()
    size = min(DEFAULT_MIN_MODEL_SIZE, num_images) if min_model_size is None else min_model_size
    if mapper == "hierarchical":
        options.incremental_options.random_seed = 0
        options.incremental_options.min_model_size = size
    else:
        options.random_seed = 0
        options.min_model_size = size
    if mapper == "global":  # its sub-solvers take their own seeds
        m = options.mapper
        for sub in (m, m.rotation_averaging, m.global_positioning, m.retriangulation):
            sub.random_seed = 0
    return options


def _set_min_model_size(options: Any, size: int) -> None:
    target = getattr(options, "incremental_options", options)
    target.min_model_size = size


def _min_model_size(options: Any) -> int:
    return int(getattr(options, "incremental_options", options).min_model_size)


@dataclass
class ReconstructionSummary:
    """Figures of the largest model (``sfm_dir/sparse/0``)."""

    sfm_dir: Path
    num_images: int
    num_registered: int
    num_points3D: int
    mean_track_length: float
    mean_reprojection_error: float
    mean_observations_per_image: float
    num_models: int
    num_verified_pairs: int
    unregistered: list[str] = field(default_factory=list)
    failed_images: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    mapper: str = DEFAULT_MAPPER

    def format(self) -> str:
        lines = [
            f"Reconstruction in {self.sfm_dir / 'sparse' / '0'}:",
            f"  registered images       {self.num_registered} / {self.num_images}",
            f"  3D points               {self.num_points3D}",
            f"  mean track length       {self.mean_track_length:.3f}",
            f"  mean reprojection error {self.mean_reprojection_error:.3f} px",
            f"  observations per image  {self.mean_observations_per_image:.1f}",
            f"  verified pairs          {self.num_verified_pairs}",
            f"  models                  {self.num_models}",
            f"  mapper                  {self.mapper}",
        ]
        if self.unregistered:
            lines.append(f"  not registered: {', '.join(self.unregistered)}")
        if self.failed_images:
            lines.append(f"  skipped (unreadable): {', '.join(self.failed_images)}")
        if self.timings:
            lines.append("  time per stage          " + ", ".join(
                f"{stage} {seconds:.1f} s" for stage, seconds in self.timings.items()))
        return "\n".join(lines)


def follow_log_level() -> None:
    """COLMAP's own log lines follow dift-sfm's: `-q` (WARNING) keeps only its errors."""
    quiet = logging.getLogger("dift_sfm").getEffectiveLevel() > logging.INFO
    pycolmap.logging.minloglevel = 2 if quiet else 0


def verify_database(database: Path | str,
                    options: pycolmap.TwoViewGeometryOptions | None = None) -> int:
    """pycolmap geometric verification of every matched pair; returns the verified pair count
    (pairs with at least one inlier, see ``verified_pairs``)."""
    database = Path(database)
    if options is None:
        options = pycolmap.TwoViewGeometryOptions()
        options.ransac.random_seed = 0
    pycolmap.geometric_verification(database, two_view_geometry_options=options)
    return verified_pairs(database)[0]


def verified_pairs(database: Path | str) -> tuple[int, int]:
    """(pairs whose two-view geometry has inliers, most inliers of one pair) of a database.

    COLMAP writes a two-view geometry row for every pair it tried, failed ones too (0 inliers,
    ``num_verified_image_pairs`` counts them): those are not verified pairs.
    """
    uri = Path(database).absolute().as_uri() + "?mode=ro"
    with sqlite3.connect(uri, uri=True) as con:
        count, best = con.execute(
            "SELECT COUNT(*), MAX(rows) FROM two_view_geometries WHERE rows > 0").fetchone()
    con.close()
    return int(count), int(best or 0)


def run_mapping(database: Path | str, image_dir: Path | str, sfm_dir: Path | str,
                min_model_size: int | None = None, options: Any = None,
                mapper: str = DEFAULT_MAPPER) -> list[pycolmap.Reconstruction]:
    """Map a verified database; writes the models, largest first, to ``sfm_dir/sparse/{0,1,...}``.

    ``mapper`` is one of ``MAPPERS``; ``options`` its pycolmap options object
    (``IncrementalPipelineOptions``, ``GlobalPipelineOptions`` or
    ``HierarchicalPipelineOptions``; default ``mapper_options(mapper, ...)``). The previous
    ``sparse`` folder is replaced only once mapping succeeded. ``min_model_size`` (default: the
    one of ``options``, else COLMAP's 10 capped at the number of images) is the fewest
    registered images a model needs to be kept. Raises ReconstructionError when no model is
    built, DiftSfmError for an unknown mapper or options of another mapper.
    """
    function, options_class = PYCOLMAP_MAPPERS[check_mapper(mapper)]
    database, sfm_dir = Path(database), Path(sfm_dir)
    with pycolmap.Database.open(database) as db:
        num_images = db.num_images()
    if options is None:
        options = mapper_options(mapper, num_images, min_model_size)
    elif not isinstance(options, getattr(pycolmap, options_class)):
        raise DiftSfmError(f"Mapper '{mapper}' takes pycolmap.{options_class}, not "
                           f"{type(options).__name__}.")
    if min_model_size is not None:
        _set_min_model_size(options, min_model_size)
    work = sfm_dir / "sparse.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logger.info("%s mapping of %d images (min model size %d)...", mapper.capitalize(),
                num_images, _min_model_size(options))
    models = getattr(pycolmap, function)(database, image_dir, work / "raw", options)
    models = sorted(models.values(), key=lambda r: (r.num_reg_images(), r.num_points3D()),
                    reverse=True)
    if not models:
        shutil.rmtree(work, ignore_errors=True)
        raise ReconstructionError(_no_model_reason(database, options, mapper))
    for i, rec in enumerate(models):
        (work / "sparse" / str(i)).mkdir(parents=True)
        rec.write_binary(work / "sparse" / str(i))
    final = sfm_dir / "sparse"
    old = sfm_dir / "sparse.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    (work / "sparse").rename(final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return models


def _no_model_reason(database: Path, options: Any, mapper: str) -> str:
    """Why mapping built no model, with the figures that tell the causes apart."""
    count, best = verified_pairs(database)
    if mapper != "incremental":
        return (f"Mapping ({mapper}) built no model from {database} ({count} verified pairs, "
                f"the best with {best} inliers; models need at least "
                f"{_min_model_size(options)} images). Try exhaustive pairs, more keypoints, "
                "--mapper incremental, or a lower --min-model-size.")
    init = options.mapper
    if best < init.init_min_num_inliers:
        return (f"Mapping built no model from {database}: too few verified matches ({count} "
                f"verified pairs, the best with {best} inliers; COLMAP starts from a pair with "
                f"at least {init.init_min_num_inliers}). Try exhaustive pairs, more keypoints, "
                "or more overlapping photos.")
    return (f"Mapping built no model from {database} although {count} pair(s) are verified (the "
            f"best with {best} inliers): COLMAP found no initial pair with enough baseline "
            f"(triangulation angle over {init.init_min_tri_angle:g} deg) or no model of at "
            f"least {options.min_model_size} images. Photos taken from further apart help, or "
            "a lower --min-model-size.")


def summarize_model(rec: pycolmap.Reconstruction, database: Path | str, sfm_dir: Path | str,
                    num_models: int = 1, failed_images: dict[str, str] | None = None
                    ) -> ReconstructionSummary:
    """Registered images, 3D points, mean track length and reprojection error of ``rec``."""
    with pycolmap.Database.open(database) as db:
        names = sorted(im.name for im in db.read_all_images())
    verified = verified_pairs(database)[0]
    registered = {rec.images[i].name for i in rec.reg_image_ids()}
    return ReconstructionSummary(
        sfm_dir=Path(sfm_dir),
        num_images=len(names),
        num_registered=rec.num_reg_images(),
        num_points3D=rec.num_points3D(),
        mean_track_length=float(rec.compute_mean_track_length()),
        mean_reprojection_error=float(rec.compute_mean_reprojection_error()),
        mean_observations_per_image=float(rec.compute_mean_observations_per_reg_image()),
        num_models=num_models,
        num_verified_pairs=verified,
        unregistered=[n for n in names if n not in registered],
        failed_images=dict(failed_images or {}),
    )
