"""Step 3: COLMAP reconstruction from features.h5 + matches.h5 (pycolmap).

    images ─► database.db (cameras, images: pycolmap's image reader, EXIF focal when present)
    features.h5 ─► keypoints (+0.5: COLMAP puts the top-left pixel centre at (0.5, 0.5))
    matches.h5 + pairs ─► raw matches ─► pycolmap geometric verification ─► incremental mapping
    ─► sfm_dir/sparse/0 (largest model, COLMAP binary), sparse/1, ... (smaller ones, if any)

Keypoints and matches go into the database through Python's sqlite3 in ONE ``BEGIN IMMEDIATE``
transaction that is rolled back on any error (pycolmap's ``DatabaseTransaction`` commits what
was written when an exception leaves it). The blobs follow COLMAP's schema: keypoints
(rows=N, cols=2, float32 x y), matches (rows=M, cols=2, uint32 row-major) keyed by
``pycolmap.image_pair_to_pair_id`` with columns swapped when ``pycolmap.should_swap_image_pair``.
So ``import_into_database`` either writes everything or nothing, and a database locked by
another process gives a clear error and stays unchanged. ``reconstruct`` builds a fresh database
in a temporary file and atomically replaces ``sfm_dir/database.db`` with it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pycolmap

from .errors import DiftSfmError, FormatError, ImageReadError, PartialFailure
from .formats.features import list_names
from .formats.h5store import open_h5
from .formats.matches import matches_in
from .pairs import read_pairs
from .progress import progress

logger = logging.getLogger("dift_sfm")

CAMERA_MODES = {
    "auto": pycolmap.CameraMode.AUTO,
    "single": pycolmap.CameraMode.SINGLE,
    "per-folder": pycolmap.CameraMode.PER_FOLDER,
    "per-image": pycolmap.CameraMode.PER_IMAGE,
}
CAMERA_MODELS = [m for m in pycolmap.CameraModelId.__members__ if m != "INVALID"]
COLMAP_TABLES = ("cameras", "images", "keypoints", "descriptors", "matches",
                 "two_view_geometries")


class DatabaseError(DiftSfmError):
    """A COLMAP database is missing, malformed, or does not fit the features/matches/pairs."""


class DatabaseLockedError(DatabaseError):
    """Another process holds a lock on the database; nothing was changed."""


class ReconstructionError(DiftSfmError):
    """Geometric verification or mapping produced no usable model."""


@dataclass
class ImportStats:
    """What ``import_into_database`` wrote."""

    num_images: int = 0
    num_keypoints: int = 0
    num_pairs: int = 0
    num_matches: int = 0


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
        ]
        if self.unregistered:
            lines.append(f"  not registered: {', '.join(self.unregistered)}")
        if self.failed_images:
            lines.append(f"  skipped (unreadable): {', '.join(self.failed_images)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- names
def check_image_names(names: Iterable[str], source: str = "the image list") -> list[str]:
    """Refuse names that would collide in a COLMAP database or an hloc matches.h5.

    Duplicate names are, for dift-sfm: the same name twice; names equal up to letter case
    (``a.jpg`` / ``a.JPG``: one file on macOS and Windows, so the database would not be
    portable); and names that differ only by '/' vs '-' (``a/b.jpg`` / ``a-b.jpg``: the same
    pair key in matches.h5). Each gives a DatabaseError naming both.
    """
    names = list(names)
    for label, norm in (("twice", lambda n: n),
                        ("differing only in letter case", str.casefold),
                        ("differing only by '/' vs '-' (one matches.h5 key)",
                         lambda n: n.replace("/", "-"))):
        seen: dict[str, str] = {}
        for name in names:
            key = norm(name)
            if key in seen:
                other = seen[key]
                what = f"'{name}'" if other == name else f"'{other}' and '{name}'"
                raise DatabaseError(f"Duplicate image names in {source}: {what} ({label}). "
                                    "COLMAP identifies images by name: rename one of them.")
            seen[key] = name
    return names


# --------------------------------------------------------------------------- database creation
def _check_camera_args(camera_mode: str, camera_model: str) -> None:
    if camera_mode not in CAMERA_MODES:
        raise DiftSfmError(f"Unknown camera mode '{camera_mode}'; "
                           f"choose one of {', '.join(CAMERA_MODES)}.")
    if camera_model not in CAMERA_MODELS:
        raise DiftSfmError(f"Unknown camera model '{camera_model}'; "
                           f"choose one of {', '.join(CAMERA_MODELS)}.")


def create_database(database: Path | str, image_dir: Path | str, names: list[str],
                    camera_mode: str = "auto",
                    camera_model: str = "SIMPLE_RADIAL") -> dict[str, int]:
    """Create a COLMAP database with cameras and images (no features) for ``names``.

    Uses pycolmap's image reader, so intrinsics follow COLMAP: the EXIF focal length when the
    file has one (35 mm equivalent or make/model sensor width), else ``1.2 * max(W, H)``;
    principal point at the centre. Camera modes: ``auto`` (consecutive images share a camera
    when size, EXIF make/model and focal length agree), ``single``, ``per-folder``,
    ``per-image``. Raises DatabaseError if ``database`` exists, or if an image could not be
    imported (unreadable, or another size than its shared camera). Returns name -> image_id.
    """
    database, image_dir = Path(database), Path(image_dir)
    _check_camera_args(camera_mode, camera_model)
    if not names:
        raise DiftSfmError(f"No images to put in database {database}.")
    if database.exists():
        raise DatabaseError(f"Database {database} already exists.")
    check_image_names(names)
    missing = [n for n in names if not (image_dir / n).is_file()]
    if missing:
        raise ImageReadError(f"Images not found in {image_dir}: {', '.join(missing[:5])}.")
    pycolmap.Database.open(database).close()  # the schema
    options = pycolmap.ImageReaderOptions()
    options.camera_model = camera_model
    try:
        pycolmap.import_images(database, image_dir, CAMERA_MODES[camera_mode], names, options)
        with pycolmap.Database.open(database) as db:
            images = {im.name: im.image_id for im in db.read_all_images()}
            num_cameras = db.num_cameras()
    except BaseException:
        _remove_db(database)
        raise
    not_imported = [n for n in names if n not in images]
    if not_imported:
        _remove_db(database)
        hint = (" In camera mode 'single'/'per-folder' all images sharing a camera must have "
                "the same size: use --camera-mode auto or per-image."
                if camera_mode in ("single", "per-folder") else "")
        raise DatabaseError(f"COLMAP could not import {len(not_imported)} image(s) into "
                            f"{database}: {', '.join(not_imported[:5])} (unreadable, or another "
                            f"size than the camera they share).{hint}")
    logger.info("Database %s: %d images, %d cameras (mode %s, model %s).", database, len(images),
                num_cameras, camera_mode, camera_model)
    return images


# --------------------------------------------------------------------------- sqlite access
def _connect(database: Path, lock_timeout: float) -> sqlite3.Connection:
    """Open an existing COLMAP database read-write (never creates one) and take the write lock."""
    if not database.is_file():
        raise DatabaseError(f"Database {database} does not exist. Create it with COLMAP "
                            "(feature_extractor / image importer) or `dift-sfm reconstruct`.")
    uri = database.absolute().as_uri() + "?mode=rw"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=lock_timeout, isolation_level=None)
    except sqlite3.Error as err:
        raise DatabaseError(f"Could not open database {database}: {err}.") from err
    try:
        con.execute("BEGIN IMMEDIATE")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.OperationalError as err:
        con.close()
        raise _sqlite_error(database, err) from err
    except sqlite3.DatabaseError as err:
        con.close()
        raise DatabaseError(f"{database} is not an SQLite database ({err}).") from err
    missing = [t for t in COLMAP_TABLES if t not in tables]
    if missing:
        con.rollback()
        con.close()
        raise DatabaseError(f"{database} is not a COLMAP database (no table "
                            f"{', '.join(missing)}).")
    return con


def _sqlite_error(database: Path, err: sqlite3.Error) -> DiftSfmError:
    text = str(err).lower()
    if "locked" in text or "busy" in text:
        return DatabaseLockedError(
            f"Database {database} is locked by another process (COLMAP GUI, another mapper or "
            "import?). Nothing was changed; close the other program and run again.")
    return DatabaseError(f"SQLite error on database {database}: {err}. Nothing was changed.")


def _pair_ids_touching(con: sqlite3.Connection, table: str, image_ids: set[int]) -> list[int]:
    out = []
    for (pair_id,) in con.execute(f"SELECT pair_id FROM {table}"):
        id1, id2 = pycolmap.pair_id_to_image_pair(pair_id)
        if id1 in image_ids or id2 in image_ids:
            out.append(pair_id)
    return out


def _read_features(feature_path: Path, names: list[str]) -> dict[str, tuple[np.ndarray, tuple]]:
    """name -> ((N, 2) float32 keypoints, (W, H) or None) from an hloc features file."""
    out = {}
    with open_h5(feature_path) as f:
        for name in names:
            group = f.get(name)
            if not isinstance(group, h5py.Group) or "keypoints" not in group:
                raise FormatError(f"Image '{name}' has no keypoints in features file "
                                  f"{feature_path}.")
            kpts = np.asarray(group["keypoints"][()], np.float32)
            if kpts.ndim != 2 or kpts.shape[1] < 2:
                raise FormatError(f"Keypoints of '{name}' in {feature_path} have shape "
                                  f"{kpts.shape}, expected (N, 2).")
            size = tuple(int(v) for v in group["image_size"][()]) if "image_size" in group \
                else None
            out[name] = (np.ascontiguousarray(kpts[:, :2]), size)
    return out


def _read_pair_matches(match_path: Path, pairs: list[tuple[str, str]],
                       num_kpts: dict[str, int]) -> list[np.ndarray]:
    """(M, 2) int64 keypoint index pairs per pair, validated against the keypoint counts."""
    out = []
    with open_h5(match_path) as f:
        for name0, name1 in pairs:
            matches, _, rev, n_stored = matches_in(f, name0, name1, match_path)
            first = name1 if rev else name0  # the image whose matches0 is stored
            if n_stored != num_kpts[first] or (len(matches) and (
                    matches[:, 0].max() >= num_kpts[name0]
                    or matches[:, 1].max() >= num_kpts[name1])):
                raise FormatError(
                    f"Matches of ({name0}, {name1}) in {match_path} do not fit the features "
                    f"file ({n_stored} stored vs {num_kpts[first]} keypoints in '{first}', "
                    f"{num_kpts[name0]} / {num_kpts[name1]} keypoints in '{name0}' / "
                    f"'{name1}'): were they computed from other features?")
            out.append(matches)
    return out


def import_into_database(
    database: Path | str,
    features: Path | str,
    matches: Path | str,
    pairs: Path | str,
    overwrite: bool = False,
    lock_timeout: float = 5.0,
) -> ImportStats:
    """Write our keypoints and raw matches into an existing COLMAP database.

    Images are matched by name. Keypoints are written (+0.5) for every image of the features
    file that the database holds; raw matches for every pair of ``pairs``. Refuses, with nothing
    changed, when: a pair names an image absent from the database or the features file; a pair
    is missing from the matches file or its indices do not fit the keypoints; a feature file's
    image size differs from the database camera's; or an image already has keypoints (or a pair
    matches) in the database, unless ``overwrite`` (which deletes the keypoints, descriptors,
    matches and two-view geometries touching these images first). Everything happens in one
    transaction, rolled back on any error; a database locked by another process raises
    DatabaseLockedError after ``lock_timeout`` seconds.
    """
    database, features, matches, pairs = map(Path, (database, features, matches, pairs))
    if not features.is_file():
        raise FormatError(f"Features file {features} does not exist.")
    if not matches.is_file():
        raise FormatError(f"Matches file {matches} does not exist.")
    feature_names = set(list_names(features))
    pair_list = read_pairs(pairs, known_names=feature_names)
    con = _connect(database, lock_timeout)
    try:
        stats = _import(con, database, features, matches, pairs, pair_list, feature_names,
                        overwrite)
        con.execute("COMMIT")
    except sqlite3.Error as err:
        con.rollback()
        raise _sqlite_error(database, err) from err
    except BaseException:
        con.rollback()
        raise
    finally:
        con.close()
    logger.info("Imported %d images (%d keypoints) and %d pairs (%d raw matches) into %s.",
                stats.num_images, stats.num_keypoints, stats.num_pairs, stats.num_matches,
                database)
    return stats


def _import(con: sqlite3.Connection, database: Path, features: Path, matches: Path,
            pairs_path: Path, pairs: list[tuple[str, str]], feature_names: set[str],
            overwrite: bool) -> ImportStats:
    image_ids: dict[str, int] = {}
    cam_size: dict[str, tuple[int, int]] = {}
    for image_id, name, w, h in con.execute(
            "SELECT images.image_id, images.name, cameras.width, cameras.height FROM images "
            "JOIN cameras ON images.camera_id = cameras.camera_id"):
        image_ids[name] = int(image_id)
        cam_size[name] = (int(w), int(h))
    if not image_ids:
        raise DatabaseError(f"Database {database} has no images: import the images first.")
    missing = sorted({n for p in pairs for n in p} - image_ids.keys())
    if missing:
        raise DatabaseError(f"Pairs file {pairs_path} names {len(missing)} image(s) that are not "
                            f"in database {database}: {', '.join(missing[:5])}. Names must match "
                            "the database's image names exactly (relative paths).")
    names = sorted(n for n in feature_names if n in image_ids)
    if not names:
        raise DatabaseError(f"No image of features file {features} is in database {database}: "
                            f"e.g. '{next(iter(feature_names), '')}' vs '{next(iter(image_ids))}'.")
    without = [n for n in image_ids if n not in feature_names]
    if without:
        logger.warning("%d database images have no features in %s (they will not be matched): "
                       "%s", len(without), features, ", ".join(sorted(without)[:5]))
    ids = {image_ids[n] for n in names}
    old_kpts = [image_id for (image_id,) in con.execute("SELECT image_id FROM keypoints")
                if image_id in ids]
    old_pairs = {t: _pair_ids_touching(con, t, ids) for t in ("matches", "two_view_geometries")}
    if (old_kpts or any(old_pairs.values())) and not overwrite:
        inv = {v: k for k, v in image_ids.items()}
        which = ", ".join(sorted(inv[i] for i in old_kpts)[:5])
        raise DatabaseError(
            f"Database {database} already has keypoints for {len(old_kpts)} of these images "
            f"({which}) and matches/geometries for {sum(map(len, old_pairs.values()))} pairs "
            "involving them. Use --overwrite (overwrite=True) to replace them; nothing was "
            "changed.")

    feats = _read_features(features, names)
    for name, (_, size) in feats.items():
        if size is not None and size != cam_size[name]:
            raise DatabaseError(
                f"Image '{name}' is {cam_size[name][0]}x{cam_size[name][1]} in database "
                f"{database} but its features in {features} were computed on a {size[0]}x"
                f"{size[1]} image: not the same image, or a resized copy.")
    num_kpts = {n: len(k) for n, (k, _) in feats.items()}
    pair_matches = _read_pair_matches(matches, pairs, num_kpts)

    if overwrite:
        placeholders = ",".join("?" * len(ids))
        for table in ("keypoints", "descriptors"):
            con.execute(f"DELETE FROM {table} WHERE image_id IN ({placeholders})", sorted(ids))
        for table, pair_ids in old_pairs.items():
            con.executemany(f"DELETE FROM {table} WHERE pair_id = ?", [(p,) for p in pair_ids])
        if old_kpts:
            logger.warning("Replaced the keypoints of %d images and deleted %d matched pairs "
                           "in %s.", len(old_kpts), len(old_pairs["matches"]), database)

    stats = ImportStats()
    for name in progress(names, desc="keypoints", unit="img", disable=len(names) < 50):
        kpts = feats[name][0] + 0.5  # hloc (0, 0) -> COLMAP (0.5, 0.5) pixel centre
        con.execute("INSERT INTO keypoints (image_id, rows, cols, data) VALUES (?, ?, ?, ?)",
                    (image_ids[name], kpts.shape[0], 2, np.ascontiguousarray(kpts).tobytes()))
        stats.num_images += 1
        stats.num_keypoints += len(kpts)
    rows = []
    for (name0, name1), m in zip(pairs, pair_matches, strict=True):
        id0, id1 = image_ids[name0], image_ids[name1]
        if pycolmap.should_swap_image_pair(id0, id1):
            id0, id1, m = id1, id0, m[:, ::-1]
        data = np.ascontiguousarray(m, dtype=np.uint32)
        rows.append((pycolmap.image_pair_to_pair_id(id0, id1), len(data), 2, data.tobytes()))
        stats.num_pairs += 1
        stats.num_matches += len(data)
    con.executemany("INSERT INTO matches (pair_id, rows, cols, data) VALUES (?, ?, ?, ?)", rows)
    return stats


# --------------------------------------------------------------------------- verification, mapping
def verify_database(database: Path | str,
                    options: pycolmap.TwoViewGeometryOptions | None = None) -> int:
    """pycolmap geometric verification of every matched pair; returns the verified pair count."""
    database = Path(database)
    if options is None:
        options = pycolmap.TwoViewGeometryOptions()
        options.ransac.random_seed = 0
    pycolmap.geometric_verification(database, two_view_geometry_options=options)
    with pycolmap.Database.open(database) as db:
        return db.num_verified_image_pairs()


def run_mapping(database: Path | str, image_dir: Path | str, sfm_dir: Path | str,
                min_model_size: int | None = None,
                options: pycolmap.IncrementalPipelineOptions | None = None,
                ) -> list[pycolmap.Reconstruction]:
    """Incremental mapping; writes the models, largest first, to ``sfm_dir/sparse/{0,1,...}``.

    The previous ``sparse`` folder is replaced only once mapping succeeded. ``min_model_size``
    (default: the one of ``options``, else COLMAP's 10 capped at the number of images) is the
    fewest registered images a model needs to be kept. Raises ReconstructionError when no
    model is built.
    """
    database, sfm_dir = Path(database), Path(sfm_dir)
    with pycolmap.Database.open(database) as db:
        num_images = db.num_images()
    if options is None:
        options = pycolmap.IncrementalPipelineOptions()
        options.random_seed = 0
        options.min_model_size = min(10, num_images)
    if min_model_size is not None:
        options.min_model_size = min_model_size
    work = sfm_dir / "sparse.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logger.info("Incremental mapping of %d images (min model size %d)...", num_images,
                options.min_model_size)
    models = pycolmap.incremental_mapping(database, image_dir, work / "raw", options)
    models = sorted(models.values(), key=lambda r: (r.num_reg_images(), r.num_points3D()),
                    reverse=True)
    if not models:
        shutil.rmtree(work, ignore_errors=True)
        raise ReconstructionError(
            f"Mapping built no model from {database}: too few verified matches. Try exhaustive "
            "pairs, more keypoints, or a lower --min-model-size.")
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


def summarize(rec: pycolmap.Reconstruction, database: Path | str, sfm_dir: Path | str,
              num_models: int = 1, failed_images: dict[str, str] | None = None
              ) -> ReconstructionSummary:
    """Registered images, 3D points, mean track length and reprojection error of ``rec``."""
    with pycolmap.Database.open(database) as db:
        names = sorted(im.name for im in db.read_all_images())
        verified = db.num_verified_image_pairs()
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


def _remove_db(path: Path) -> None:
    for p in (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal"),
              path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)


def reconstruct(
    sfm_dir: Path | str,
    image_dir: Path | str,
    pairs: Path | str,
    features: Path | str,
    matches: Path | str,
    camera_mode: str = "auto",
    camera_model: str = "SIMPLE_RADIAL",
    image_list: list[str] | None = None,
    min_model_size: int | None = None,
    verification_options: pycolmap.TwoViewGeometryOptions | None = None,
    mapper_options: pycolmap.IncrementalPipelineOptions | None = None,
    failed_images: dict[str, str] | None = None,
) -> tuple[pycolmap.Reconstruction, ReconstructionSummary]:
    """features.h5 + matches.h5 + pairs -> ``sfm_dir/database.db`` and ``sfm_dir/sparse/0``.

    Like ``hloc.reconstruction.main``. The database holds the images of ``image_list``
    (default: every image of the features file). It is built from scratch in
    ``database.db.tmp``, verified, then atomically moved over ``database.db``, so an old database
    is only replaced by a complete one. Returns the largest model and its summary (also logged).
    """
    sfm_dir, image_dir = Path(sfm_dir), Path(image_dir)
    sfm_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(image_list) if image_list is not None else list_names(features)
    if not names:
        raise FormatError(f"Features file {features} holds no image.")
    check_image_names(names, f"features file {features}")
    database = sfm_dir / "database.db"
    tmp = sfm_dir / "database.db.tmp"
    _remove_db(tmp)
    try:
        create_database(tmp, image_dir, names, camera_mode, camera_model)
        import_into_database(tmp, features, matches, pairs)
        logger.info("Geometric verification...")
        verified = verify_database(tmp, verification_options)
    except BaseException:
        _remove_db(tmp)
        raise
    logger.info("%d verified pairs.", verified)
    # A stale rollback journal beside the old file would be "replayed" into the new one.
    database.with_name(database.name + "-journal").unlink(missing_ok=True)
    os.replace(tmp, database)
    models = run_mapping(database, image_dir, sfm_dir, min_model_size, mapper_options)
    summary = summarize(models[0], database, sfm_dir, len(models), failed_images)
    logger.info("Model %s: %d/%d images registered, %d points, mean track length %.2f, mean "
                "reprojection error %.3f px.", sfm_dir / "sparse" / "0", summary.num_registered,
                summary.num_images, summary.num_points3D, summary.mean_track_length,
                summary.mean_reprojection_error)
    return models[0], summary


# --------------------------------------------------------------------------- whole pipeline
PAIR_STRATEGIES = ("exhaustive", "sequential", "retrieval")


def _check_matcher(match_path: Path, conf: dict, overwrite: bool) -> None:
    """Refuse to extend a matches file written with other matcher settings."""
    if overwrite or not match_path.exists():
        return
    with open_h5(match_path) as f:
        old = f.attrs.get("matcher_json")
    if old is None:
        return
    old = old.decode() if isinstance(old, bytes) else str(old)
    if json.loads(old) != conf["matcher"]:
        raise FormatError(f"Matches file {match_path} was written with other matcher settings "
                          f"({old}). Use --overwrite to recompute it, or another --output.")


def make_pairs(strategy: str, names: list[str], output: Path, feature_path: Path,
               image_dir: Path, window: int = 5, num_neighbors: int = 10,
               retrieval_method: str | None = None,
               skip: set[str] | frozenset[str] = frozenset()) -> Path:
    """Write the pairs of ``names`` for a strategy (or a pairs FILE) into ``output``.

    A pairs file is validated against ``names`` (line-numbered errors); its pairs naming an
    image in ``skip`` (unreadable) are dropped with a warning.
    """
    from .pairs import exhaustive_pairs, sequential_pairs, write_pairs
    from .retrieval import retrieval_pairs

    if strategy == "exhaustive":
        pairs, path = exhaustive_pairs(names), output / "pairs-exhaustive.txt"
    elif strategy == "sequential":
        pairs = sequential_pairs(names, window=window)
        path = output / f"pairs-sequential{window}.txt"
    elif strategy == "retrieval":
        method = retrieval_method or "vlad"
        pairs = retrieval_pairs(names, num_neighbors, feature_path=feature_path,
                                image_dir=image_dir, method=method)
        path = output / f"pairs-retrieval-{method}{num_neighbors}.txt"
    else:
        src = Path(strategy)
        if not src.is_file():
            raise DiftSfmError(f"--pairs must be one of {', '.join(PAIR_STRATEGIES)} or an "
                               f"existing pairs file; '{strategy}' is neither.")
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


def run_pipeline(
    conf: dict,
    image_dir: Path | str,
    output: Path | str,
    pairs: str = "exhaustive",
    window: int = 5,
    num_neighbors: int = 10,
    retrieval_method: str | None = None,
    image_list: Path | str | list[str] | None = None,
    camera_mode: str = "auto",
    camera_model: str = "SIMPLE_RADIAL",
    min_model_size: int | None = None,
    overwrite: bool = False,
) -> tuple[pycolmap.Reconstruction, ReconstructionSummary]:
    """extract -> pairs -> match -> database -> verify -> map, everything under ``output``.

    Files: ``<conf output>.h5`` (features), ``pairs-<strategy>.txt``,
    ``<conf output>_matches.h5``, ``database.db``, ``sparse/0``. Features and matches are
    resumable (finished images/pairs are reused unless ``overwrite``); the database and the
    model are rebuilt each run. Unreadable images are logged as errors and left out; the others
    are reconstructed and the summary lists the skipped ones.
    """
    from .extract import extract_features
    from .images import resolve_image_list
    from .match import match_features

    image_dir, output = Path(image_dir), Path(output)
    _check_camera_args(camera_mode, camera_model)  # fail before any work
    if pairs not in PAIR_STRATEGIES and not Path(pairs).is_file():
        raise DiftSfmError(f"--pairs must be one of {', '.join(PAIR_STRATEGIES)} or an "
                           f"existing pairs file; '{pairs}' is neither.")
    names = resolve_image_list(image_dir, image_list)
    check_image_names(names, f"image directory {image_dir}" if image_list is None
                      else f"image list {image_list}" if isinstance(image_list, (str, Path))
                      else "the image list")
    output.mkdir(parents=True, exist_ok=True)
    features = output / f"{conf['output']}.h5"
    failed: dict[str, str] = {}
    try:
        extract_features(conf, image_dir, features, image_list=names, overwrite=overwrite)
    except PartialFailure as err:
        failed = dict(err.failures)
        logger.error("Continuing without %d unreadable image(s): %s", len(failed),
                     "; ".join(f"{n}: {e}" for n, e in failed.items()))
    done = set(list_names(features))
    ok = [n for n in names if n in done]
    if len(ok) < 2:
        raise DiftSfmError(f"Only {len(ok)} readable image(s) in {image_dir}: nothing to "
                           "reconstruct.")
    pairs_path = make_pairs(pairs, ok, output, features, image_dir, window, num_neighbors,
                            retrieval_method, skip=set(failed))
    matches = output / f"{conf['output']}_matches.h5"
    _check_matcher(matches, conf, overwrite)
    match_features(conf, pairs_path, features, matches, overwrite=overwrite)
    return reconstruct(output, image_dir, pairs_path, features, matches, camera_mode,
                       camera_model, image_list=ok, min_model_size=min_model_size,
                       failed_images=failed)
