"""Structure-from-Motion from a folder of images, like hloc's pipelines in one call.

    extract (features.h5) ─► pairs (pairs-*.txt) ─► match (matches.h5)
    ─► colmap.database (database.db: cameras, images, keypoints, raw matches)
    ─► colmap.mapping (geometric verification, incremental/global/hierarchical mapping
       ─► sparse/0, ...)

``run_pipeline`` runs it all under one output folder; ``reconstruct`` is the second half, from
existing features/matches/pairs files (like ``hloc.reconstruction.main``). It builds a fresh
database in a temporary file and atomically replaces ``sfm_dir/database.db`` with it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .colmap import DEFAULT_CAMERA_MODE, DEFAULT_CAMERA_MODEL
from .colmap.database import (
    check_camera_args,
    check_image_names,
    create_database,
    import_into_database,
    lock_database,
    remove_database,
)
from .colmap.mapping import (
    DEFAULT_MAPPER,
    ReconstructionSummary,
    check_mapper,
    follow_log_level,
    run_mapping,
    summarize_model,
    verify_database,
)
from .errors import DiftSfmError, FormatError, PartialFailure
from .extract import extract_features
from .formats.features import list_names
from .images import resolve_image_list
from .match import match_features
from .pairs import (
    PAIR_STRATEGIES,
    check_pair_args,
    check_pairable,
    generate_pairs,
    read_pairs,
    write_pairs,
)
from .report import report_after_run

if TYPE_CHECKING:
    import pycolmap

    from .distributed import RayOptions

logger = logging.getLogger("dift_sfm")
F = TypeVar("F", bound=Callable)

__all__ = ["PAIR_STRATEGIES", "make_pairs", "reconstruct", "run_pipeline"]


_held = threading.local()  # .folders: the folders whose lock this thread holds


def _one_run_per_folder(param: str, check: Callable[..., None] | None = None
                        ) -> Callable[[F], F]:
    """Decorator: the function holds the lock of ``<folder>/database.db``
    (``colmap.database.lock_database``), the folder being its argument ``param``, while it
    runs. Re-entrant in one thread (``run_pipeline`` calls ``reconstruct``); another process,
    or thread, gets OutputLockedError at once. ``check(**arguments)`` refuses bad arguments
    before the lock creates the folder."""
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            if check is not None:
                bound.apply_defaults()
                check(**bound.arguments)
            folder = Path(bound.arguments[param]).absolute()
            held = getattr(_held, "folders", None)
            if held is None:
                held = _held.folders = set()
            if folder in held:
                return fn(*args, **kwargs)
            lock = lock_database(folder / "database.db")  # creates the folder
            held.add(folder)
            try:
                return fn(*args, **kwargs)
            finally:
                held.discard(folder)
                lock.release()
        return locked  # type: ignore[return-value]
    return decorate


def _check_mapping_args(mapper: str = DEFAULT_MAPPER, **_: Any) -> None:
    check_mapper(mapper)


def _check_pipeline_args(pairs: str, window: int | None, num_neighbors: int | None,
                         camera_mode: str, camera_model: str, mapper: str, **_: Any) -> None:
    check_camera_args(camera_mode, camera_model)
    check_mapper(mapper)
    check_pair_args(pairs, window, num_neighbors)


@_one_run_per_folder("sfm_dir", check=_check_mapping_args)
def reconstruct(
    sfm_dir: Path | str,
    image_dir: Path | str,
    pairs: Path | str,
    features: Path | str,
    matches: Path | str,
    camera_mode: str = DEFAULT_CAMERA_MODE,
    camera_model: str = DEFAULT_CAMERA_MODEL,
    image_list: list[str] | None = None,
    min_model_size: int | None = None,
    verification_options: pycolmap.TwoViewGeometryOptions | None = None,
    mapper_options: pycolmap.IncrementalPipelineOptions | pycolmap.GlobalPipelineOptions
    | pycolmap.HierarchicalPipelineOptions | None = None,
    failed_images: dict[str, str] | None = None,
    mapper: str = DEFAULT_MAPPER,
) -> tuple[pycolmap.Reconstruction, ReconstructionSummary]:
    """features.h5 + matches.h5 + pairs -> ``sfm_dir/database.db`` and ``sfm_dir/sparse/0``.

    Like ``hloc.reconstruction.main``. The database holds the images of ``image_list``
    (default: every image of the features file). It is built from scratch in
    ``database.db.tmp``, verified, then atomically moved over ``database.db``, so an old database
    is only replaced by a complete one. ``mapper``: incremental (default), global or
    hierarchical (``colmap.MAPPERS``); ``mapper_options`` are that mapper's pycolmap
    options. Returns the largest model and its summary (also logged).
    One reconstruction per ``sfm_dir`` at a time: another process working there (``reconstruct``,
    ``colmap-import`` on its database) makes this one stop at once with OutputLockedError.
    """
    sfm_dir, image_dir = Path(sfm_dir), Path(image_dir)
    sfm_dir.mkdir(parents=True, exist_ok=True)
    follow_log_level()
    timings: dict[str, float] = {}
    names = sorted(image_list) if image_list is not None else list_names(features)
    if not names:
        raise FormatError(f"Features file {features} holds no image.")
    check_image_names(names, f"features file {features}")
    database = sfm_dir / "database.db"
    tmp = sfm_dir / "database.db.tmp"
    remove_database(tmp)
    try:
        with timed(timings, "database"):
            create_database(tmp, image_dir, names, camera_mode, camera_model)
            import_into_database(tmp, features, matches, pairs)
        logger.info("Geometric verification...")
        with timed(timings, "verification"):
            verified = verify_database(tmp, verification_options)
    except BaseException:
        remove_database(tmp)
        raise
    logger.info("%d verified pairs.", verified)
    # A stale rollback journal beside the old file would be "replayed" into the new one.
    database.with_name(database.name + "-journal").unlink(missing_ok=True)
    os.replace(tmp, database)
    with timed(timings, "mapping"):
        models = run_mapping(database, image_dir, sfm_dir, min_model_size, mapper_options,
                             mapper)
    summary = summarize_model(models[0], database, sfm_dir, len(models), failed_images)
    summary.timings, summary.mapper = timings, mapper
    logger.info("Model %s: %d/%d images registered, %d points, mean track length %.2f, mean "
                "reprojection error %.3f px.", sfm_dir / "sparse" / "0", summary.num_registered,
                summary.num_images, summary.num_points3D, summary.mean_track_length,
                summary.mean_reprojection_error)
    return models[0], summary


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def make_pairs(strategy: str, names: list[str], output: Path, feature_path: Path,
               image_dir: Path, window: int | None = None, num_neighbors: int | None = None,
               retrieval_method: str | None = None,
               skip: set[str] | frozenset[str] = frozenset()) -> Path:
    """Write the pairs of ``names`` for a strategy (``pairs.generate_pairs``; ``None`` settings
    take its defaults) or a pairs FILE into ``output/pairs-<label>.txt``.

    A pairs file is validated against ``names`` (line-numbered errors); its pairs naming an
    image in ``skip`` (unreadable) are dropped with a warning.
    """
    if strategy in PAIR_STRATEGIES:
        pairs, label = generate_pairs(strategy, names, window=window,
                                      num_neighbors=num_neighbors, feature_path=feature_path,
                                      image_dir=image_dir, retrieval_method=retrieval_method)
        path = output / f"pairs-{label}.txt"
    else:
        check_pair_args(strategy)
        src = Path(strategy)
        try:
            pairs = read_pairs(src, known_names=set(names) | set(skip))
        except FormatError as err:
            raise FormatError(f"{err} (pairs must name images of {image_dir})") from err
        dropped = [p for p in pairs if p[0] in skip or p[1] in skip]
        if dropped:
            logger.warning("Dropping %d pairs of %s that name unreadable images.", len(dropped),
                           src)
        pairs = [p for p in pairs if p not in dropped]
        path = output / f"pairs-{src.stem}.txt"
        if path.resolve() == src.resolve():
            path = output / f"pairs-{src.stem}-used.txt"
    if not pairs:
        raise DiftSfmError(f"No image pairs to match ({strategy}, {len(names)} images).")
    write_pairs(path, pairs)
    logger.info("%d pairs (%s) in %s.", len(pairs), strategy, path)
    return path


@_one_run_per_folder("output", check=_check_pipeline_args)
def run_pipeline(
    conf: dict,
    image_dir: Path | str,
    output: Path | str,
    pairs: str = "exhaustive",
    window: int | None = None,
    num_neighbors: int | None = None,
    retrieval_method: str | None = None,
    image_list: Path | str | list[str] | None = None,
    camera_mode: str = DEFAULT_CAMERA_MODE,
    camera_model: str = DEFAULT_CAMERA_MODEL,
    min_model_size: int | None = None,
    overwrite: bool = False,
    ray: RayOptions | None = None,
    mapper: str = DEFAULT_MAPPER,
) -> tuple[pycolmap.Reconstruction, ReconstructionSummary]:
    """extract -> pairs -> match -> database -> verify -> map, everything under ``output``.

    With ``ray`` (``dift_sfm.distributed.RayOptions``), extraction and matching run on a Ray
    cluster (same files as without it).

    Files: ``<conf output>.h5`` (features), ``pairs-<strategy>.txt``,
    ``<conf output>_matches.h5``, ``database.db``, ``sparse/0``. Features and matches are
    resumable (finished images/pairs are reused unless ``overwrite``); the database and the
    model are rebuilt each run. Unreadable images are logged as errors and left out; the others
    are reconstructed and the summary lists the skipped ones. ``window`` and
    ``num_neighbors`` of ``None`` take the defaults of ``pairs.generate_pairs``. One run per
    ``output`` folder at a time, as for ``reconstruct``.
    """
    image_dir, output = Path(image_dir), Path(output)  # arguments checked by the decorator
    names = resolve_image_list(image_dir, image_list)  # refuses colliding names
    check_pairable(names, f"image folder {image_dir}")  # before extraction, naming the file
    output.mkdir(parents=True, exist_ok=True)
    features = output / f"{conf['output']}.h5"
    failed: dict[str, str] = {}
    timings: dict[str, float] = {}
    try:
        extract_backend = match_backend = None
        if ray is not None:
            from .distributed import RayExtractBackend, RayMatchBackend

            extract_backend = RayExtractBackend(conf, image_dir, ray)
            match_backend = RayMatchBackend(conf["matcher"], ray)
        with timed(timings, "extract"):
            extract_features(conf, image_dir, features, image_list=names, overwrite=overwrite,
                             backend=extract_backend)
    except PartialFailure as err:
        failed = dict(err.failures)
        logger.error("Continuing without %d unreadable image(s): %s", len(failed),
                     "; ".join(f"{n}: {e}" for n, e in failed.items()))
    done = set(list_names(features))
    ok = [n for n in names if n in done]
    if len(ok) < 2:
        raise DiftSfmError(f"Only {len(ok)} readable image(s) in {image_dir}: nothing to "
                           "reconstruct.")
    with timed(timings, "pairs"):
        pairs_path = make_pairs(pairs, ok, output, features, image_dir, window, num_neighbors,
                                retrieval_method, skip=set(failed))
    matches = output / f"{conf['output']}_matches.h5"
    with timed(timings, "match"):
        match_features(conf, pairs_path, features, matches, overwrite=overwrite,
                       backend=match_backend)
    model, summary = reconstruct(output, image_dir, pairs_path, features, matches, camera_mode,
                                 camera_model, image_list=ok, min_model_size=min_model_size,
                                 failed_images=failed, mapper=mapper)
    summary.timings = {**timings, **summary.timings}
    report_after_run(output, image_dir, summary, features, matches, pairs_path)  # never raises
    return model, summary
