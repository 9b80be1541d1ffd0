"""A COLMAP database from dift-sfm files: cameras and images, then keypoints and raw matches.

    images ─► database.db (cameras, images: pycolmap's image reader, EXIF focal when present)
    features.h5 ─► keypoints (+0.5: COLMAP puts the top-left pixel centre at (0.5, 0.5))
    matches.h5 + pairs ─► raw matches (verification and mapping: :mod:`.mapping`)

Keypoints and matches go into the database through Python's sqlite3 in ONE ``BEGIN IMMEDIATE``
transaction that is rolled back on any error (pycolmap's ``DatabaseTransaction`` commits what
was written when an exception leaves it). The blobs follow COLMAP's schema: keypoints
(rows=N, cols=2, float32 x y), matches (rows=M, cols=2, uint32 row-major) keyed by
``pycolmap.image_pair_to_pair_id`` with columns swapped when ``pycolmap.should_swap_image_pair``.
So ``import_into_database`` either writes everything or nothing, and a database locked by
another process gives a clear error and stays unchanged.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap

from ..errors import DiftSfmError, FormatError, ImageReadError
from ..formats.features import FeaturesReader
from ..formats.h5store import OutputLock
from ..formats.matches import MatchesReader, matches_in
from ..images import check_image_names as _check_names
from ..pairs import read_pairs
from ..progress import progress
from . import CAMERA_MODES, DEFAULT_CAMERA_MODE, DEFAULT_CAMERA_MODEL

logger = logging.getLogger("dift_sfm")

_PYCOLMAP_CAMERA_MODES = {
    "auto": pycolmap.CameraMode.AUTO,
    "single": pycolmap.CameraMode.SINGLE,
    "per-folder": pycolmap.CameraMode.PER_FOLDER,
    "per-image": pycolmap.CameraMode.PER_IMAGE,
}
assert tuple(_PYCOLMAP_CAMERA_MODES) == CAMERA_MODES
CAMERA_MODELS = [m for m in pycolmap.CameraModelId.__members__ if m != "INVALID"]
COLMAP_TABLES = ("cameras", "images", "keypoints", "descriptors", "matches",
                 "two_view_geometries")


class DatabaseError(DiftSfmError):
    """A COLMAP database is missing, malformed, or does not fit the features/matches/pairs."""


class DatabaseLockedError(DatabaseError):
    """Another process holds a lock on the database; nothing was changed."""


@dataclass
class ImportStats:
    """What ``import_into_database`` wrote."""

    num_images: int = 0
    num_keypoints: int = 0
    num_pairs: int = 0
    num_matches: int = 0


def check_image_names(names: Iterable[str], source: str = "the image list") -> list[str]:
    """Refuse names that would collide in a COLMAP database (see
    :func:`dift_sfm.images.check_image_names`, the rule) with a DatabaseError."""
    try:
        return _check_names(names, source)
    except DiftSfmError as err:
        raise DatabaseError(f"{err} COLMAP identifies images by name.") from err


def check_camera_args(camera_mode: str, camera_model: str) -> None:
    """Raise DiftSfmError for a camera mode or COLMAP camera model name that does not exist."""
    if camera_mode not in CAMERA_MODES:
        raise DiftSfmError(f"Unknown camera mode '{camera_mode}'; "
                           f"choose one of {', '.join(CAMERA_MODES)}.")
    if camera_model not in CAMERA_MODELS:
        raise DiftSfmError(f"Unknown camera model '{camera_model}'; "
                           f"choose one of {', '.join(CAMERA_MODELS)}.")


def remove_database(path: Path) -> None:
    """Delete a database file and its SQLite journal / WAL files, if present."""
    for p in (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal"),
              path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)


def lock_database(database: Path) -> OutputLock:
    """The one-writer lock of a database (``<database>.lock``, the h5 writer's ``flock``): held
    by ``import_into_database`` and by ``dift_sfm.sfm`` for a whole reconstruction, released by
    ``.release()`` or when the process dies. A second holder gets OutputLockedError at once."""
    return OutputLock(Path(database))


# --------------------------------------------------------------------------- cameras and images
def create_database(database: Path | str, image_dir: Path | str, names: list[str],
                    camera_mode: str = DEFAULT_CAMERA_MODE,
                    camera_model: str = DEFAULT_CAMERA_MODEL) -> dict[str, int]:
    """Create a COLMAP database with cameras and images (no features) for ``names``.

    Uses pycolmap's image reader, so intrinsics follow COLMAP: the EXIF focal length when the
    file has one (35 mm equivalent or make/model sensor width), else ``1.2 * max(W, H)``;
    principal point at the centre. Camera modes: ``auto`` (consecutive images share a camera
    when size, EXIF make/model and focal length agree), ``single``, ``per-folder``,
    ``per-image``. Raises DatabaseError if ``database`` exists, or if an image could not be
    imported (unreadable, or another size than its shared camera). Returns name -> image_id.
    """
    database, image_dir = Path(database), Path(image_dir)
    check_camera_args(camera_mode, camera_model)
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
        pycolmap.import_images(database, image_dir, _PYCOLMAP_CAMERA_MODES[camera_mode], names,
                               options)
        with pycolmap.Database.open(database) as db:
            images = {im.name: im.image_id for im in db.read_all_images()}
            num_cameras = db.num_cameras()
    except BaseException:
        remove_database(database)
        raise
    not_imported = [n for n in names if n not in images]
    if not_imported:
        remove_database(database)
        hint = (" In camera mode 'single'/'per-folder' all images sharing a camera must have "
                "the same size: use --camera-mode auto or per-image."
                if camera_mode in ("single", "per-folder") else "")
        raise DatabaseError(f"COLMAP could not import {len(not_imported)} image(s) into "
                            f"{database}: {', '.join(not_imported[:5])} (unreadable, or another "
                            f"size than the camera they share).{hint}")
    logger.info("Database %s: %d images, %d cameras (mode %s, model %s).", database, len(images),
                num_cameras, camera_mode, camera_model)
    return images


# --------------------------------------------------------------------------- keypoints, matches
def _check_exists(database: Path) -> None:
    if not database.is_file():
        raise DatabaseError(f"Database {database} does not exist. Create it with COLMAP "
                            "(feature_extractor / image importer) or `dift-sfm reconstruct`.")


def _connect(database: Path, lock_timeout: float) -> sqlite3.Connection:
    """Open an existing COLMAP database read-write (never creates one) and take the write lock."""
    _check_exists(database)
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


def _read_features(features: FeaturesReader,
                   names: list[str]) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """name -> ((N, 2) float32 keypoints, (W, H)) of complete entries of a features file."""
    out = {}
    for name in names:
        kpts = features.keypoints(name)
        if kpts.ndim != 2 or kpts.shape[1] != 2:
            raise FormatError(f"Keypoints of '{name}' in {features.path} have shape "
                              f"{kpts.shape}, expected (N, 2).")
        out[name] = (np.ascontiguousarray(kpts), features.image_size(name))
    return out


def _read_pair_matches(matches: MatchesReader, pairs: list[tuple[str, str]],
                       num_kpts: dict[str, int],
                       fingerprints: dict[str, str]) -> list[np.ndarray]:
    """(M, 2) int64 keypoint index pairs per pair, validated against the features: the
    fingerprints the pair records (dift-sfm files), else the keypoint counts (any file)."""
    out = []
    for name0, name1 in pairs:
        recorded = matches.provenance(name0, name1)
        if recorded is not None and recorded != (fingerprints[name0], fingerprints[name1]):
            raise FormatError(
                f"Matches of ({name0}, {name1}) in {matches.path} were computed from other "
                "features than the features file's (other keypoints or descriptors): re-run "
                "`dift-sfm match` with this features file (--overwrite).")
        m, _, rev, n_stored = matches_in(matches.file, name0, name1, matches.path)
        first = name1 if rev else name0  # the image whose matches0 is stored
        if n_stored != num_kpts[first] or (len(m) and (
                m[:, 0].max() >= num_kpts[name0] or m[:, 1].max() >= num_kpts[name1])):
            raise FormatError(
                f"Matches of ({name0}, {name1}) in {matches.path} do not fit the features "
                f"file ({n_stored} stored vs {num_kpts[first]} keypoints in '{first}', "
                f"{num_kpts[name0]} / {num_kpts[name1]} keypoints in '{name0}' / "
                f"'{name1}'): were they computed from other features?")
        out.append(m)
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
    DatabaseLockedError after ``lock_timeout`` seconds, and one that another dift-sfm process
    writes (``lock_database``) OutputLockedError at once.
    """
    database, features, matches, pairs = map(Path, (database, features, matches, pairs))
    if not features.is_file():
        raise FormatError(f"Features file {features} does not exist.")
    if not matches.is_file():
        raise FormatError(f"Matches file {matches} does not exist.")
    with FeaturesReader(features) as reader:
        feature_names = set(reader.names)
    pair_list = read_pairs(pairs, known_names=feature_names)
    _check_exists(database)
    lock = lock_database(database)  # another dift-sfm run on it: refused at once
    try:
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
    finally:
        lock.release()
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
    num_old_pairs = len(set().union(*old_pairs.values()))  # a pair in both tables: once
    if (old_kpts or num_old_pairs) and not overwrite:
        inv = {v: k for k, v in image_ids.items()}
        which = ", ".join(sorted(inv[i] for i in old_kpts)[:5])
        raise DatabaseError(
            f"Database {database} already has keypoints for {len(old_kpts)} of these images "
            f"({which}) and matches or two-view geometries for {num_old_pairs} pairs "
            "involving them. Use --overwrite (overwrite=True) to replace them; nothing was "
            "changed.")

    with FeaturesReader(features) as reader:
        feats = _read_features(reader, names)
        fingerprints = {n: reader.fingerprint(n) for n in {n for p in pairs for n in p}}
    for name, (_, size) in feats.items():
        if size != cam_size[name]:
            raise DatabaseError(
                f"Image '{name}' is {cam_size[name][0]}x{cam_size[name][1]} in database "
                f"{database} but its features in {features} were computed on a {size[0]}x"
                f"{size[1]} image: not the same image, or a resized copy.")
    num_kpts = {n: len(k) for n, (k, _) in feats.items()}
    with MatchesReader(matches) as reader:
        pair_matches = _read_pair_matches(reader, pairs, num_kpts, fingerprints)

    if overwrite:
        placeholders = ",".join("?" * len(ids))
        for table in ("keypoints", "descriptors"):
            con.execute(f"DELETE FROM {table} WHERE image_id IN ({placeholders})", sorted(ids))
        for table, pair_ids in old_pairs.items():
            con.executemany(f"DELETE FROM {table} WHERE pair_id = ?", [(p,) for p in pair_ids])
        if old_kpts or num_old_pairs:
            logger.warning("Replaced the keypoints of %d images and deleted the matches and "
                           "two-view geometries of %d pairs in %s.", len(old_kpts),
                           num_old_pairs, database)

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
