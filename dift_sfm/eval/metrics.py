"""Evaluation metrics: errors of estimates against ground truth, and their AUC.

- homographies: :func:`corner_error` (mean distance of the warped image corners);
- matches: :func:`match_precision` (D2-Net's MMA of one pair), :func:`match_precision_mask`,
  :func:`epipolar_errors` (symmetric epipolar distance under the true pose, SuperGlue's);
- relative poses: :func:`rotation_error`, :func:`translation_angle_error`, :func:`pose_error`;
- :func:`error_auc`: area under the recall-vs-error curve (SuperGlue / glue-factory).

Points are (x, y) pixels with pixel centres at integer coordinates (see
:mod:`dift_sfm.geometry`); angles are in degrees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..geometry import PoseResult, warp_points

#: Homography protocols: accuracy / AUC of the corner error at these pixel thresholds.
ACC_THRESHOLDS = (1, 3, 5)
#: D2-Net's mean matching accuracy at 1..10 px.
MMA_THRESHOLDS = tuple(range(1, 11))


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


def match_precision(pts0: np.ndarray, pts1: np.ndarray, H: np.ndarray,
                    thresholds=MMA_THRESHOLDS) -> list[float]:
    """Share of matches (pts0[i], pts1[i]) with |H pts0[i] - pts1[i]| <= e, per threshold e
    (D2-Net's MMA of one pair; 0 for no matches)."""
    if len(pts0) == 0:
        return [0.0 for _ in thresholds]
    dist = np.linalg.norm(warp_points(H, pts0) - pts1, axis=1)
    dist = np.where(np.isfinite(dist), dist, np.inf)
    return [float(np.mean(dist <= t)) for t in thresholds]


def match_precision_mask(pts0: np.ndarray, pts1: np.ndarray, H: np.ndarray,
                         threshold: float = 3.0) -> np.ndarray:
    """(M,) bool: matches whose image-0 point warped by ``H`` is within ``threshold`` px."""
    if len(pts0) == 0:
        return np.zeros(0, bool)
    dist = np.linalg.norm(warp_points(H, pts0) - np.asarray(pts1, float), axis=1)
    return np.isfinite(dist) & (dist <= threshold)


def epipolar_errors(pts0: np.ndarray, pts1: np.ndarray, T_0to1: np.ndarray, K0: np.ndarray,
                    K1: np.ndarray) -> np.ndarray:
    """(M,) squared symmetric epipolar distance of matches (M, 2) under the true pose.

    In normalised image coordinates ``x = K^-1 [p, 1]``, with ``E = [t]x R`` of ``T_0to1``:
    ``(x1' E x0)^2 (1 / |(E x0)_12|^2 + 1 / |(E' x1)_12|^2)`` (SuperGlue's match precision
    uses it with threshold 5e-4), computed by kornia's ``symmetrical_epipolar_distance``.
    """
    if len(pts0) == 0:
        return np.zeros(0)
    import torch
    from kornia.geometry.epipolar import essential_from_Rt, symmetrical_epipolar_distance

    def normalised(pts: np.ndarray, K: np.ndarray) -> torch.Tensor:
        pts = np.asarray(pts, np.float64)
        x = np.c_[pts, np.ones(len(pts))] @ np.linalg.inv(np.asarray(K, np.float64)).T
        return torch.from_numpy(x)[None]

    T = torch.from_numpy(np.asarray(T_0to1, np.float64))[None]
    identity = torch.eye(3, dtype=torch.float64)[None]
    E = essential_from_Rt(identity, torch.zeros(1, 3, 1, dtype=torch.float64),
                          T[:, :3, :3], T[:, :3, 3:])
    return symmetrical_epipolar_distance(normalised(pts0, K0), normalised(pts1, K1), E)[0].numpy()


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
