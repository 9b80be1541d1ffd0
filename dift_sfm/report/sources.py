"""What a reconstruction report shows, read from files only (no model in memory, no GPU).

Sources, in order of preference:
- the COLMAP model folder (``sparse/0``: cameras, images, points3D), always;
- its ``database.db`` (keypoints, raw matches, verification inliers), when present;
- else our ``features.h5`` / ``matches.h5`` and a pairs file: raw matches from the h5 files,
  and as "inliers" the matches whose two keypoints observe the same 3D point of the model.

Keypoints are returned in OUR convention (pixel centres at integer coordinates, original
pixels): a database's COLMAP keypoints have 0.5 subtracted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DiftSfmError
from ..formats.features import FeaturesReader
from ..formats.matches import MatchesReader
from ..pairs import read_pairs

logger = logging.getLogger("dift_sfm")

__all__ = ["PairStat", "SceneData", "View", "find_model", "load_scene"]

# COLMAP's defaults that decide whether an image can be registered (IncrementalPipelineOptions):
MIN_NUM_MATCHES = 15  # pairs with fewer inliers are ignored by the mapper
ABS_POSE_MIN_INLIERS = 30  # mapper.abs_pose_min_num_inliers


@dataclass
class View:
    """A registered image: centre (3,) and world_from_cam (3, 3) in world coordinates,
    K (3, 3) in COLMAP pixels (top-left corner at 0), size (W, H)."""

    name: str
    centre: np.ndarray
    world_from_cam: np.ndarray
    K: np.ndarray
    size: tuple[int, int]
    num_points3D: int


@dataclass
class PairStat:
    """A matched pair: raw matches and inliers (verified ones, or triangulated ones)."""

    name0: str
    name1: str
    num_matches: int
    num_inliers: int

    @property
    def verified(self) -> bool:
        return self.num_inliers >= MIN_NUM_MATCHES


@dataclass
class SceneData:
    """Everything the report draws, as arrays and plain records."""

    model_dir: Path
    names: list[str]
    views: list[View]
    xyz: np.ndarray  # (P, 3) float32, a decimated subset when there are more than max_points
    rgb: np.ndarray  # (P, 3) uint8
    track_length: np.ndarray  # (P,) int32
    error: np.ndarray  # (P,) float32 reprojection error, px
    num_points: int  # before decimation
    mean_track_length: float
    mean_error: float
    pairs: list[PairStat]
    num_keypoints: dict[str, int]
    reasons: dict[str, str]  # unregistered image -> why, as far as the files tell
    inlier_source: str
    pair_source: PairSource | None = None
    other_models: dict[str, int] = field(default_factory=dict)

    @property
    def registered(self) -> set[str]:
        return {v.name for v in self.views}


def find_model(path: Path | str) -> tuple[Path, Path]:
    """(model folder holding cameras/images/points3D, the run's output folder) of ``path``: a
    ``reconstruct`` output folder (its ``sparse/0``), or a model folder itself."""
    path = Path(path)
    for model in (path / "sparse" / "0", path):
        if any((model / f"images{ext}").is_file() for ext in (".bin", ".txt")):
            # sfm_dir/sparse/0 -> sfm_dir; a bare model folder: itself
            sfm_dir = model.parents[1] if model.parent.name == "sparse" else model
            return model, sfm_dir
    raise DiftSfmError(f"No COLMAP model in {path}: expected images.bin (or .txt) there or in "
                       f"{path / 'sparse' / '0'}. Pass a `dift-sfm reconstruct` output folder "
                       "or a model folder.")


def _read_model(model_dir: Path):
    import pycolmap

    rec = pycolmap.Reconstruction()
    rec.read(model_dir)
    return rec


def _views(rec) -> list[View]:
    views = []
    for image_id in sorted(rec.reg_image_ids()):
        im = rec.images[image_id]
        cam = rec.cameras[im.camera_id]
        R = im.cam_from_world().rotation.matrix()
        views.append(View(name=im.name, centre=np.asarray(im.projection_center(), float),
                          world_from_cam=R.T, K=np.asarray(cam.calibration_matrix(), float),
                          size=(int(cam.width), int(cam.height)),
                          num_points3D=int(im.num_points3D)))
    return views


def _points(rec, max_points: int, seed: int) -> tuple[np.ndarray, ...]:
    """(xyz, rgb, track length, error) of at most ``max_points`` points (a seeded subset)."""
    ids = np.fromiter(sorted(rec.point3D_ids()), np.int64)
    n = len(ids)
    keep = ids if n <= max_points else np.sort(
        np.random.default_rng(seed).choice(ids, max_points, replace=False))
    xyz = np.empty((len(keep), 3), np.float32)
    rgb = np.empty((len(keep), 3), np.uint8)
    track = np.empty(len(keep), np.int32)
    error = np.empty(len(keep), np.float32)
    points = rec.points3D
    for i, pid in enumerate(keep.tolist()):
        p = points[pid]
        xyz[i], rgb[i], track[i], error[i] = p.xyz, p.color, p.track.length(), p.error
    return xyz, rgb, track, error


class DatabaseSource:
    """Keypoints, raw matches and verification inliers of a COLMAP database."""

    label = "geometric verification (database.db)"

    def __init__(self, path: Path):
        import pycolmap

        self.path = path
        self._pycolmap = pycolmap
        with pycolmap.Database.open(path) as db:
            images = db.read_all_images()
            cameras = {c.camera_id: (int(c.width), int(c.height))
                       for c in db.read_all_cameras()}
            self.ids = {im.name: im.image_id for im in images}
            self.sizes = {im.name: cameras[im.camera_id] for im in images}
            self.num_keypoints = {n: int(db.num_keypoints_for_image(i))
                                  for n, i in self.ids.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self.ids)

    def pair_stats(self) -> list[PairStat]:
        p2i = self._pycolmap.pair_id_to_image_pair
        with self._pycolmap.Database.open(self.path) as db:
            pair_ids, counts = db.read_num_matches()
            tv_ids, inliers = db.read_two_view_geometry_num_inliers()
        by_id = {i: n for n, i in self.ids.items()}
        num_inliers = dict(zip(tv_ids, inliers, strict=True))
        stats = []
        for pid, count in zip(pair_ids, counts, strict=True):
            i0, i1 = p2i(pid)
            stats.append(PairStat(by_id[i0], by_id[i1], int(count),
                                  int(num_inliers.get(pid, 0))))
        return stats

    def image_size(self, name: str) -> tuple[int, int]:
        """(W, H) of an image, from its camera."""
        return self.sizes[name]

    def pair(self, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                    np.ndarray]:
        """(kp0 (N0, 2), kp1 (N1, 2), matches (M, 2) indices, inlier mask (M,) bool); keypoints
        in our convention (COLMAP's minus 0.5)."""
        with self._pycolmap.Database.open(self.path) as db:
            i0, i1 = self.ids[name0], self.ids[name1]
            kp0 = db.read_keypoints(i0)[:, :2].astype(np.float32) - 0.5
            kp1 = db.read_keypoints(i1)[:, :2].astype(np.float32) - 0.5
            m = db.read_matches(i0, i1).astype(np.int64).reshape(-1, 2)
            inl = db.read_two_view_geometry(i0, i1).inlier_matches.astype(np.int64)
        return kp0, kp1, m, _row_mask(m, inl.reshape(-1, 2))


class FilesSource:
    """Raw matches of our h5 files; inliers: matches triangulated as one 3D point."""

    label = "triangulated in the model (same 3D point)"

    def __init__(self, features: Path, matches: Path, pairs: Path, rec):
        self.features, self.matches = Path(features), Path(matches)
        with FeaturesReader(self.features) as f:
            self._names = list(f.names)
            self.num_keypoints = {n: len(f.keypoints(n)) for n in self._names}
            self.sizes = {n: tuple(int(v) for v in f.image_size(n)) for n in self._names}
        self._pairs = read_pairs(pairs)
        # per registered image: point3D id of each keypoint (-1: none)
        self._p3d: dict[str, np.ndarray] = {}
        for image_id in rec.reg_image_ids():
            im = rec.images[image_id]
            ids = np.full(im.num_points2D(), -1, np.int64)
            for idx in im.get_observation_point2D_idxs():
                ids[idx] = im.points2D[idx].point3D_id
            self._p3d[im.name] = ids

    @property
    def names(self) -> list[str]:
        return sorted(self._names)

    def image_size(self, name: str) -> tuple[int, int]:
        """(W, H) of an image, as stored in the features file."""
        return self.sizes[name]

    def _inlier_mask(self, name0: str, name1: str, m: np.ndarray) -> np.ndarray:
        a, b = self._p3d.get(name0), self._p3d.get(name1)
        if a is None or b is None or not len(m):
            return np.zeros(len(m), bool)
        ok = (m[:, 0] < len(a)) & (m[:, 1] < len(b))
        mask = np.zeros(len(m), bool)
        pa, pb = a[m[ok, 0]], b[m[ok, 1]]
        mask[ok] = (pa >= 0) & (pa == pb)
        return mask

    def pair_stats(self) -> list[PairStat]:
        stats = []
        with MatchesReader(self.matches) as reader:
            for n0, n1 in self._pairs:
                if not reader.has(n0, n1):
                    continue
                m, _ = reader.matches(n0, n1)
                stats.append(PairStat(n0, n1, len(m), int(self._inlier_mask(n0, n1, m).sum())))
        return stats

    def pair(self, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                    np.ndarray]:
        with FeaturesReader(self.features) as f, MatchesReader(self.matches) as reader:
            kp0, kp1 = f.keypoints(name0), f.keypoints(name1)
            m, _ = reader.matches(name0, name1)
        return kp0, kp1, m, self._inlier_mask(name0, name1, m)


PairSource = DatabaseSource | FilesSource


def _row_mask(rows: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """(M,) bool: which rows of ``rows`` (M, 2) also appear in ``subset`` (K, 2)."""
    if not len(rows) or not len(subset):
        return np.zeros(len(rows), bool)
    base = max(int(rows.max()), int(subset.max())) + 1
    return np.isin(rows[:, 0] * base + rows[:, 1], subset[:, 0] * base + subset[:, 1])


def unregistered_reasons(names: list[str], registered: set[str], pairs: list[PairStat],
                         num_keypoints: dict[str, int], failed: dict[str, str],
                         other_models: dict[str, int]) -> dict[str, str]:
    """Why each image of ``names`` (and of ``failed``) is not in the model, as far as we know."""
    best_raw: dict[str, tuple[int, str]] = {}
    best_inl: dict[str, tuple[int, str]] = {}
    verified_to_registered: dict[str, int] = {}
    for p in pairs:
        for a, b in ((p.name0, p.name1), (p.name1, p.name0)):
            if p.num_matches > best_raw.get(a, (-1, ""))[0]:
                best_raw[a] = (p.num_matches, b)
            if p.num_inliers > best_inl.get(a, (-1, ""))[0]:
                best_inl[a] = (p.num_inliers, b)
            if p.verified and b in registered:
                verified_to_registered[a] = verified_to_registered.get(a, 0) + 1
    reasons = {n: f"unreadable, skipped: {e}" for n, e in failed.items()}
    for n in names:
        if n in registered or n in reasons:
            continue
        raw, raw_with = best_raw.get(n, (0, ""))
        inl, inl_with = best_inl.get(n, (0, ""))
        if n in other_models:
            reasons[n] = f"registered in a smaller model (sparse/{other_models[n]})"
        elif num_keypoints.get(n, 0) == 0:
            reasons[n] = "no keypoints"
        elif raw == 0:
            reasons[n] = "no matches in any pair"
        elif inl == 0:
            reasons[n] = f"no verified pair (best raw: {raw} matches with {raw_with})"
        elif inl < MIN_NUM_MATCHES:
            reasons[n] = (f"too few inliers: best {inl} with {inl_with} (a pair needs "
                          f"{MIN_NUM_MATCHES})")
        elif not verified_to_registered.get(n):
            reasons[n] = (f"verified pairs only with unregistered images (best {inl} inliers "
                          f"with {inl_with})")
        elif inl < ABS_POSE_MIN_INLIERS:
            reasons[n] = (f"too few inliers to register: best {inl} with {inl_with} (the "
                          f"mapper needs {ABS_POSE_MIN_INLIERS} 2D-3D inliers)")
        else:
            reasons[n] = (f"the mapper could not register it ({verified_to_registered[n]} "
                          f"verified pairs with registered images, best {inl} inliers with "
                          f"{inl_with}): pose estimation or bundle adjustment rejected it")
    return reasons


def _other_models(sfm_dir: Path, model_dir: Path) -> dict[str, int]:
    """Registered images of the smaller models ``sparse/1``, ``sparse/2``, ..."""
    found: dict[str, int] = {}
    sparse = model_dir.parent
    if sparse.name != "sparse":
        return found
    for sub in sorted(sparse.iterdir()):
        if sub == model_dir or not sub.name.isdigit() or not (sub / "images.bin").is_file():
            continue
        try:
            rec = _read_model(sub)
        except Exception as err:  # a broken extra model must not stop the report
            logger.debug("Could not read %s: %s", sub, err)
            continue
        for image_id in rec.reg_image_ids():
            found.setdefault(rec.images[image_id].name, int(sub.name))
    return found


def load_scene(model: Path | str, database: Path | str | None = None,
               features: Path | str | None = None, matches: Path | str | None = None,
               pairs: Path | str | None = None, failed: dict[str, str] | None = None,
               max_points: int = 200_000, seed: int = 0) -> SceneData:
    """Read a model and its matches (the database beside it, or our h5 files)."""
    model_dir, sfm_dir = find_model(model)
    rec = _read_model(model_dir)
    views = _views(rec)
    xyz, rgb, track, error = _points(rec, max_points, seed)
    if database is None and (sfm_dir / "database.db").is_file() and features is None:
        database = sfm_dir / "database.db"
    source: PairSource | None = None
    if database is not None:
        source = DatabaseSource(Path(database))
    elif features is not None and matches is not None:
        if pairs is None:
            found = sorted(sfm_dir.glob("pairs-*.txt"))
            if len(found) != 1:
                raise DiftSfmError(f"Give --pairs: {len(found)} pairs-*.txt files in {sfm_dir}.")
            pairs = found[0]
        source = FilesSource(Path(features), Path(matches), Path(pairs), rec)
    elif features is not None or matches is not None:
        raise DiftSfmError("Give both --features and --matches (or neither, with a database.db "
                           "beside the model).")
    registered = {v.name for v in views}
    names = sorted(set(source.names) | registered) if source else sorted(registered)
    pair_stats = source.pair_stats() if source else []
    num_keypoints = source.num_keypoints if source else {}
    other = _other_models(sfm_dir, model_dir)
    reasons = unregistered_reasons(names, registered, pair_stats, num_keypoints,
                                   dict(failed or {}), other)
    return SceneData(
        model_dir=model_dir, names=names, views=views, xyz=xyz, rgb=rgb, track_length=track,
        error=error, num_points=int(rec.num_points3D()),
        mean_track_length=float(rec.compute_mean_track_length()),
        mean_error=float(rec.compute_mean_reprojection_error()), pairs=pair_stats,
        num_keypoints=num_keypoints, reasons=reasons,
        inlier_source=source.label if source else "none (no database or matches given)",
        pair_source=source, other_models=other)
