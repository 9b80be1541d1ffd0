"""Two-view geometry from matched keypoints: homographies, relative poses and their errors.

Conventions: points are (x, y) in image pixels, (M, 2), row i of ``p0`` matched to row i of
``p1``. Our keypoints have pixel centres at integer coordinates (hloc); the estimators here
never shift them, so give intrinsics ``K`` in the same convention as the points (standard
pinhole K such as ScanNet's already are). A homography ``H`` maps image-0 pixels to image-1
pixels: ``p1 ~ H @ [p0, 1]``.

Estimators never raise on bad data: degenerate input (fewer than the minimal number of
matches, non-finite or collinear points) and estimator failures give a result with
``success=False`` and a ``reason``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
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
    E: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())


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


def image_corners(size: tuple[int, int]) -> np.ndarray:
    """The four corner pixel centres of an image of ``size`` (W, H): (4, 2), clockwise from
    (0, 0) to (W-1, 0), (W-1, H-1), (0, H-1)."""
    w, h = size
    return np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)


def corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, size: tuple[int, int]) -> float:
    """Mean distance (pixels of image 1) between the four corners of image 0 (``size`` (W, H))
    warped by the estimated and the true homography. ``inf`` when ``H_est`` is None."""
    if H_est is None:
        return float("inf")
    corners = image_corners(size)
    err = np.linalg.norm(warp_points(H_est, corners) - warp_points(H_gt, corners), axis=1)
    value = float(err.mean())
    return value if np.isfinite(value) else float("inf")


def scale_homography(H: np.ndarray, scale0: Sequence[float], scale1: Sequence[float]) -> np.ndarray:
    """Express ``H`` (image 0 -> image 1) between resized images.

    ``scale_i = (sx, sy)`` is new/old size of image i. With pixel centres at integers, a resize
    maps x to ``(x + 0.5) * s - 0.5``; returns ``T1 @ H @ inv(T0)``.
    """

    def transform(s: Sequence[float]) -> np.ndarray:
        sx, sy = s
        return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], float)

    out = transform(scale1) @ np.asarray(H, float) @ np.linalg.inv(transform(scale0))
    return out / out[2, 2]


def camera_from_K(K: np.ndarray, size: tuple[int, int] | None = None) -> pycolmap.Camera:
    """A ``PINHOLE`` pycolmap camera with the intrinsics of ``K`` (3, 3), used as given.

    The points passed with it must use the same pixel convention as ``K``. ``size`` (W, H)
    only fills the camera's width/height fields (default: twice the principal point).
    """
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
    return PoseResult(R, t / np.linalg.norm(t), inliers, True, E=np.asarray(out["E"]))


def rotation_error(R_est: np.ndarray, R_gt: np.ndarray) -> float:
    """Angle in degrees of the rotation ``R_est @ R_gt.T``."""
    cos = (np.trace(np.asarray(R_est) @ np.asarray(R_gt).T) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def translation_angle_error(t_est: np.ndarray, t_gt: np.ndarray, symmetric: bool = True) -> float:
    """Angle in degrees between translation directions. With ``symmetric`` (SuperGlue's
    protocol) the sign of ``t`` is ignored: ``min(e, 180 - e)``."""
    t_est, t_gt = np.asarray(t_est, float), np.asarray(t_gt, float)
    n = np.linalg.norm(t_est) * np.linalg.norm(t_gt)
    if n == 0:
        return float("inf")
    err = float(np.degrees(np.arccos(np.clip(t_est @ t_gt / n, -1.0, 1.0))))
    return min(err, 180.0 - err) if symmetric else err


def pose_error(result: PoseResult, R_gt: np.ndarray, t_gt: np.ndarray) -> tuple[float, float]:
    """(rotation error, translation angle error) in degrees; (inf, inf) for a failed result."""
    if not result.success:
        return float("inf"), float("inf")
    return rotation_error(result.R, R_gt), translation_angle_error(result.t, t_gt)


def error_auc(errors: Sequence[float], thresholds: Sequence[float]) -> list[float]:
    """Area under the recall-vs-error curve up to each threshold, divided by the threshold.

    For a threshold T, the recall curve is the piecewise-linear curve through (0, 0) and
    (e_(i), i / n) for the sorted errors e_(1) <= ... <= e_(k) <= T, then constant at k / n up
    to T (the SuperGlue / glue-factory definition). Failures count as infinite errors (they
    never add recall).
    Returns one value in [0, 1] per threshold (0 for an empty list).
    """
    errors = np.sort(np.asarray(errors, dtype=np.float64).reshape(-1))
    errors = np.where(np.isnan(errors), np.inf, errors)
    n = len(errors)
    aucs = []
    for thr in thresholds:
        if n == 0:
            aucs.append(0.0)
            continue
        below = errors[errors <= thr]
        xs = np.concatenate([[0.0], below, [thr]])
        ys = np.concatenate([[0.0], np.arange(1, len(below) + 1) / n, [len(below) / n]])
        area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))
        aucs.append(area / thr)
    return aucs
