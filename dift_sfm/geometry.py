"""Two-view geometry from matched keypoints: homography and relative-pose estimators, point maps.

Conventions: points are (x, y) in image pixels, (M, 2), row i of ``p0`` matched to row i of
``p1``. Our keypoints have pixel centres at integer coordinates (hloc); the estimators here
never shift them, so give intrinsics ``K`` in the same convention as the points (standard
pinhole K such as ScanNet's already are). A homography ``H`` maps image-0 pixels to image-1
pixels: ``p1 ~ H @ [p0, 1]``. :func:`scale_pixel_coords` is the one place that maps points
between an image and a resized copy of it.

pycolmap is imported by the estimators that use it, so that modules needing only the pixel
mapping (images, keypoints) do not load it.

Estimators never raise on bad data: degenerate input (fewer than the minimal number of
matches, non-finite or collinear points) and estimator failures give a result with
``success=False`` and a ``reason``. Errors against ground truth: :mod:`dift_sfm.eval.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import pycolmap

HOMOGRAPHY_METHODS = ("pycolmap", "ransac", "lmeds", "magsac")
_CV_METHODS = {"ransac": cv2.RANSAC, "lmeds": cv2.LMEDS, "magsac": cv2.USAC_MAGSAC}


@dataclass
class HomographyResult:
    """Output of :func:`estimate_homography`.

    Attributes:
        H: (3, 3) float64 image-0 -> image-1 homography normalised to ``H[2, 2] = 1``, or None.
        inliers: (M,) bool mask over the input matches (all False on failure).
        success: whether a usable homography was found.
        reason: why not, when ``success`` is False ("" otherwise).
    """

    H: np.ndarray | None
    inliers: np.ndarray
    success: bool
    reason: str = ""

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())


@dataclass
class PoseResult:
    """Output of :func:`estimate_relative_pose`.

    Attributes:
        R: (3, 3) rotation and ``t`` (3,) unit translation of camera 1 from camera 0
            (``x1 = R @ x0 + t`` up to the scale of t), or None on failure.
        inliers: (M,) bool mask over the input matches.
    """

    R: np.ndarray | None
    t: np.ndarray | None
    inliers: np.ndarray
    success: bool
    reason: str = ""

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())


def scale_pixel_coords(xy: np.ndarray, scale: Sequence[float] | np.ndarray) -> np.ndarray:
    """Map points (..., 2) from an image to a copy of it resized by ``scale`` = (sx, sy).

    Convention: pixel centres at integer coordinates, so pixel (0, 0) covers [-0.5, 0.5]^2
    and an image of width W spans [-0.5, W - 0.5]. A resize by ``s = new / old`` size keeps
    the image borders in place, so x maps to ``(x + 0.5) * s - 0.5`` (not ``x * s``). The
    inverse is ``scale_pixel_coords(xy, 1 / s)``. Returns float32 for float32 input (else
    float64), same shape.
    """
    xy = np.asarray(xy)
    dtype = np.float32 if xy.dtype == np.float32 else np.float64
    s = np.asarray(scale, dtype)
    return ((xy.astype(dtype) + 0.5) * s - 0.5).astype(dtype)


def _as_points(p: np.ndarray) -> np.ndarray:
    return np.asarray(p, dtype=np.float64).reshape(-1, 2)


def _check_points(p0: np.ndarray, p1: np.ndarray, minimum: int) -> str:
    """A reason why (p0, p1) cannot give a model, or "" if they might."""
    if len(p0) != len(p1):
        return f"point arrays differ in length ({len(p0)} vs {len(p1)})"
    if len(p0) < minimum:
        return f"{len(p0)} matches, need at least {minimum}"
    if not (np.isfinite(p0).all() and np.isfinite(p1).all()):
        return "non-finite point coordinates"
    for p in (p0, p1):
        centred = p - p.mean(0)
        sv = np.linalg.svd(centred, compute_uv=False)
        scale = max(float(sv[0]), 1e-12)
        if sv[1] / scale < 1e-6:
            return "all points are collinear (or coincide)"
    return ""


def _valid_homography(H: np.ndarray | None) -> tuple[np.ndarray | None, str]:
    if H is None:
        return None, "estimator returned no model"
    H = np.asarray(H, dtype=np.float64)
    if H.shape != (3, 3) or not np.isfinite(H).all():
        return None, "non-finite homography"
    if abs(H[2, 2]) < 1e-12:
        return None, "homography with H[2,2] = 0"
    H = H / H[2, 2]
    sv = np.linalg.svd(H, compute_uv=False)
    if sv[-1] / sv[0] < 1e-10:
        return None, "singular homography"
    return H, ""


def estimate_homography(
    p0: np.ndarray,
    p1: np.ndarray,
    method: str = "pycolmap",
    threshold: float = 3.0,
    seed: int = 0,
    confidence: float = 0.9999,
    max_iters: int = 10000,
) -> HomographyResult:
    """Robustly fit ``H`` with ``p1 ~ H p0`` from matched points (M, 2).

    Args:
        method: ``pycolmap`` (COLMAP LO-RANSAC, ``RANSACOptions(max_error=threshold)``),
            ``ransac`` / ``lmeds`` / ``magsac`` (OpenCV ``findHomography`` with ``RANSAC``,
            ``LMEDS`` or ``USAC_MAGSAC``; LMEDS has no threshold).
        threshold: inlier reprojection error in pixels (of image 1).
        seed: random seed (pycolmap's ``random_seed``; ``cv2.setRNGSeed`` for OpenCV).
    """
    if method not in HOMOGRAPHY_METHODS:
        raise ValueError(f"Unknown homography method '{method}', use one of {HOMOGRAPHY_METHODS}.")
    p0, p1 = _as_points(p0), _as_points(p1)
    no_inliers = np.zeros(len(p0), bool)
    reason = _check_points(p0, p1, 4)
    if reason:
        return HomographyResult(None, no_inliers, False, reason)
    H, mask = None, None
    try:
        if method == "pycolmap":
            import pycolmap

            options = pycolmap.RANSACOptions(
                max_error=float(threshold), random_seed=int(seed), confidence=confidence,
                max_num_trials=int(max_iters))
            out = pycolmap.estimate_homography_matrix(p0, p1, estimation_options=options)
            if out is not None:
                H, mask = out["H"], out["inlier_mask"]
        else:
            cv2.setRNGSeed(int(seed))
            H, mask = cv2.findHomography(
                p0, p1, _CV_METHODS[method], ransacReprojThreshold=float(threshold),
                maxIters=int(max_iters), confidence=confidence)
    except (cv2.error, ValueError, RuntimeError) as err:  # estimator-internal failure
        return HomographyResult(None, no_inliers, False, f"{method} failed: {err}")
    H, reason = _valid_homography(H)
    if H is None:
        return HomographyResult(None, no_inliers, False, reason)
    inliers = np.asarray(mask, bool).reshape(-1) if mask is not None else no_inliers
    if inliers.shape != no_inliers.shape:
        inliers = no_inliers
    return HomographyResult(H, inliers, True)


def warp_points(H: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a homography to (N, 2) points -> (N, 2); points mapped to infinity give inf/nan."""
    points = _as_points(points)
    homog = np.concatenate([points, np.ones((len(points), 1))], 1) @ np.asarray(H, float).T
    with np.errstate(divide="ignore", invalid="ignore"):
        return homog[:, :2] / homog[:, 2:]


def scale_homography(H: np.ndarray, scale0: Sequence[float], scale1: Sequence[float]) -> np.ndarray:
    """Express ``H`` (image 0 -> image 1) between resized images.

    ``scale_i = (sx, sy)`` is new/old size of image i; points map as in
    :func:`scale_pixel_coords`. Returns ``T1 @ H @ inv(T0)``, normalised to ``H[2, 2] = 1``.
    """

    def transform(s: Sequence[float]) -> np.ndarray:
        # the affine map of scale_pixel_coords: x' = s * x + (s - 1) / 2
        sx, sy = s
        offset = scale_pixel_coords(np.zeros(2), (sx, sy))
        return np.array([[sx, 0, offset[0]], [0, sy, offset[1]], [0, 0, 1]], float)

    out = transform(scale1) @ np.asarray(H, float) @ np.linalg.inv(transform(scale0))
    return out / out[2, 2]


def camera_from_K(K: np.ndarray, size: tuple[int, int] | None = None) -> pycolmap.Camera:
    """A ``PINHOLE`` pycolmap camera with the intrinsics of ``K`` (3, 3), used as given.

    The points passed with it must use the same pixel convention as ``K``. ``size`` (W, H)
    only fills the camera's width/height fields (default: twice the principal point).
    """
    import pycolmap

    K = np.asarray(K, dtype=np.float64)
    if size is None:
        size = (max(int(round(2 * K[0, 2])), 1), max(int(round(2 * K[1, 2])), 1))
    return pycolmap.Camera(model="PINHOLE", width=int(size[0]), height=int(size[1]),
                           params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]])


def estimate_relative_pose(
    p0: np.ndarray,
    p1: np.ndarray,
    K0: np.ndarray,
    K1: np.ndarray,
    threshold: float = 1.0,
    seed: int = 0,
    confidence: float = 0.9999,
) -> PoseResult:
    """Relative pose of camera 1 from camera 0 via pycolmap's essential matrix (LO-RANSAC and
    cheirality-checked decomposition).

    Args:
        p0, p1: (M, 2) matched pixels; same pixel convention as ``K0``/``K1``.
        threshold: inlier epipolar error in pixels (pycolmap converts it to normalised units
            with the cameras).
    Returns: R (3, 3), unit t (3,) with ``x1 = R x0 + t``, inlier mask, or a failed result.
    """
    p0, p1 = _as_points(p0), _as_points(p1)
    no_inliers = np.zeros(len(p0), bool)
    reason = _check_points(p0, p1, 5)
    if reason:
        return PoseResult(None, None, no_inliers, False, reason)
    import pycolmap

    options = pycolmap.RANSACOptions(max_error=float(threshold), random_seed=int(seed),
                                     confidence=confidence)
    try:
        out = pycolmap.estimate_essential_matrix(
            p0, p1, camera_from_K(K0), camera_from_K(K1), estimation_options=options)
    except (ValueError, RuntimeError) as err:
        return PoseResult(None, None, no_inliers, False, f"pycolmap failed: {err}")
    if out is None:
        return PoseResult(None, None, no_inliers, False, "estimator returned no model")
    pose = out["cam2_from_cam1"]
    R = np.asarray(pose.rotation.matrix(), np.float64)
    t = np.asarray(pose.translation, np.float64)
    if not (np.isfinite(R).all() and np.isfinite(t).all()) or np.linalg.norm(t) == 0:
        return PoseResult(None, None, no_inliers, False, "non-finite pose")
    inliers = np.asarray(out["inlier_mask"], bool).reshape(-1)
    return PoseResult(R, t / np.linalg.norm(t), inliers, True)
