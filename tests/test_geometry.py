"""Homography / relative-pose estimators, their degenerate inputs, the pixel-centre mapping, and
the error metrics of dift_sfm.eval.metrics."""

from __future__ import annotations

import numpy as np
import pytest

from dift_sfm.eval.metrics import (
    corner_error,
    epipolar_errors,
    error_auc,
    image_corners,
    pose_error,
    rotation_error,
    translation_angle_error,
)
from dift_sfm.geometry import (
    HOMOGRAPHY_METHODS,
    estimate_homography,
    estimate_relative_pose,
    scale_homography,
    scale_pixel_coords,
    warp_points,
)

H_TRUE = np.array([[0.95, 0.08, 12.0], [-0.05, 1.02, -7.0], [2e-4, -1e-4, 1.0]])


def _rot(axis: np.ndarray, deg: float) -> np.ndarray:
    """Rodrigues' formula."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _homography_matches(n=200, outliers=0.3, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    p0 = rng.uniform([0, 0], [640, 480], (n, 2))
    p1 = warp_points(H_TRUE, p0) + rng.normal(0, noise, (n, 2))
    bad = rng.random(n) < outliers
    p1[bad] = rng.uniform([0, 0], [640, 480], (bad.sum(), 2))
    return p0, p1, ~bad


@pytest.mark.parametrize("method", HOMOGRAPHY_METHODS)
def test_homography_recovers_truth(method):
    p0, p1, good = _homography_matches(outliers=0.3 if method != "lmeds" else 0.2)
    res = estimate_homography(p0, p1, method=method, threshold=2.0)
    assert res.success and res.reason == ""
    assert corner_error(res.H, H_TRUE, (640, 480)) < 1.0
    assert res.inliers.shape == (len(p0),) and res.inliers.dtype == bool
    # Nearly all true matches are inliers and nearly no outlier is.
    assert (res.inliers & good).sum() >= 0.95 * good.sum()
    assert (res.inliers & ~good).sum() <= 3


def test_homography_seeded_is_deterministic():
    p0, p1, _ = _homography_matches(outliers=0.5, seed=3)
    for method in ("pycolmap", "ransac"):
        a = estimate_homography(p0, p1, method, seed=7)
        b = estimate_homography(p0, p1, method, seed=7)
        np.testing.assert_array_equal(a.H, b.H)
        np.testing.assert_array_equal(a.inliers, b.inliers)


@pytest.mark.parametrize("method", HOMOGRAPHY_METHODS)
def test_homography_degenerate_inputs_fail_cleanly(method):
    rng = np.random.default_rng(0)
    cases = {
        "empty": (np.zeros((0, 2)), np.zeros((0, 2))),
        "three": (rng.random((3, 2)) * 100, rng.random((3, 2)) * 100),
        "collinear": (np.c_[np.arange(20.0), 2 * np.arange(20.0)],
                      np.c_[np.arange(20.0), 3 * np.arange(20.0) + 1]),
        "same point": (np.ones((10, 2)), rng.random((10, 2)) * 50),
        "nan": (np.r_[rng.random((9, 2)) * 100, [[np.nan, 1]]], rng.random((10, 2)) * 100),
        "length mismatch": (rng.random((10, 2)), rng.random((9, 2))),
    }
    for name, (p0, p1) in cases.items():
        res = estimate_homography(p0, p1, method=method)
        assert not res.success, name
        assert res.H is None and res.reason, name
        assert res.inliers.shape == (len(p0),) and not res.inliers.any(), name
        assert corner_error(res.H, H_TRUE, (640, 480)) == float("inf")


def test_homography_unknown_method():
    with pytest.raises(ValueError, match="Unknown homography method"):
        estimate_homography(np.zeros((5, 2)), np.zeros((5, 2)), method="dlt")


def test_corner_error_by_hand():
    size = (200, 100)
    corners = image_corners(size)
    np.testing.assert_array_equal(corners, [[0, 0], [199, 0], [199, 99], [0, 99]])
    shift = np.array([[1, 0, 3.0], [0, 1, 4.0], [0, 0, 1]])  # every corner moves by 5 px
    assert corner_error(shift, np.eye(3), size) == pytest.approx(5.0)
    assert corner_error(H_TRUE, H_TRUE, size) == pytest.approx(0.0, abs=1e-9)
    # a scaling about the origin: corners move by 0, 19.9, sqrt(19.9^2 + 9.9^2), 9.9
    scale = np.diag([1.1, 1.1, 1.0])
    expected = np.mean([0, 19.9, np.hypot(19.9, 9.9), 9.9])
    assert corner_error(scale, np.eye(3), size) == pytest.approx(expected)


def test_scale_homography_matches_resized_frames():
    rng = np.random.default_rng(1)
    s0, s1 = (0.5, 0.52), (0.75, 0.7)
    Hs = scale_homography(H_TRUE, s0, s1)
    p = rng.uniform(0, 400, (50, 2))
    # p in original frame 0 -> resized frame 0, and H p -> resized frame 1
    p_r = (p + 0.5) * s0 - 0.5
    expected = (warp_points(H_TRUE, p) + 0.5) * s1 - 0.5
    np.testing.assert_allclose(warp_points(Hs, p_r), expected, atol=1e-9)


def test_scale_pixel_coords_keeps_borders_and_dtype():
    xy = np.array([[-0.5, -0.5], [0.0, 0.0], [99.5, 49.5]], np.float32)
    out = scale_pixel_coords(xy, (0.5, 2.0))
    # the image borders (-0.5 and W - 0.5) map to the resized image's borders
    np.testing.assert_allclose(out, [[-0.5, -0.5], [-0.25, 0.5], [49.5, 99.5]])
    assert out.dtype == np.float32
    back = scale_pixel_coords(out.astype(np.float64), (2.0, 0.5))
    assert back.dtype == np.float64
    np.testing.assert_allclose(back, xy, atol=1e-6)


def test_epipolar_errors_by_hand():
    """kornia's symmetric epipolar distance against the formula, written out here."""
    R = _rot([0.3, 1.0, -0.2], 9)
    t = np.array([0.7, -0.2, 0.3])
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    K0 = np.array([[520.0, 0, 319.5], [0, 515.0, 239.5], [0, 0, 1]])
    K1 = np.array([[480.0, 0, 330.0], [0, 482.0, 250.0], [0, 0, 1]])
    p0, p1 = _two_view(R, t, K0, K1, n=50, noise=2.0, seed=3)
    x0 = np.c_[p0, np.ones(len(p0))] @ np.linalg.inv(K0).T
    x1 = np.c_[p1, np.ones(len(p1))] @ np.linalg.inv(K1).T
    E = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]]) @ R
    Ex0, Etx1 = x0 @ E.T, x1 @ E
    expected = np.sum(x1 * Ex0, 1) ** 2 * (1 / (Ex0[:, 0] ** 2 + Ex0[:, 1] ** 2)
                                           + 1 / (Etx1[:, 0] ** 2 + Etx1[:, 1] ** 2))
    errors = epipolar_errors(p0, p1, T, K0, K1)
    np.testing.assert_allclose(errors, expected, rtol=1e-9)
    exact = _two_view(R, t, K0, K1, n=20, noise=0.0)
    assert np.all(epipolar_errors(*exact, T, K0, K1) < 1e-16)
    assert epipolar_errors(np.zeros((0, 2)), np.zeros((0, 2)), T, K0, K1).shape == (0,)


def test_error_auc_by_hand():
    # recall curve through (0,0), (1, .5), (2, 1): area up to 2 is .25 + .75 = 1 -> 0.5
    assert error_auc([1.0, 2.0], [2.0]) == pytest.approx([0.5])
    # up to 1: triangle of area .25 -> .25; up to 4: 1 + 2 * 1 = 3 -> .75
    assert error_auc([2.0, 1.0], [1.0, 4.0]) == pytest.approx([0.25, 0.75])
    # failures (inf / nan) never add recall; an error above the threshold neither
    assert error_auc([1.0, np.inf, float("nan"), 10.0], [2.0]) == pytest.approx(
        [(0.5 * 0.25 + 1 * 0.25) / 2])
    assert error_auc([0.0, 0.0], [1.0]) == pytest.approx([1.0])
    assert error_auc([], [1.0, 3.0]) == [0.0, 0.0]
    # numerical check against a dense sampling of the recall curve: linear between the
    # sorted errors below the threshold, flat from the last of them on (SuperGlue's AUC)
    rng = np.random.default_rng(0)
    errs = np.r_[rng.exponential(2.0, 40), [np.inf] * 5]
    srt = np.sort(errs[errs <= 5])
    xs = np.linspace(0, 5, 200001)
    recall = np.interp(xs, np.r_[0, srt], np.r_[0, np.arange(1, len(srt) + 1)] / len(errs))
    dense = np.sum((recall[1:] + recall[:-1]) / 2 * np.diff(xs)) / 5
    assert error_auc(errs, [5.0])[0] == pytest.approx(dense, abs=1e-6)


def test_angular_errors():
    R = _rot([0, 1, 0], 10)
    assert rotation_error(R, np.eye(3)) == pytest.approx(10.0)
    assert rotation_error(R @ _rot([1, 0, 0], 3), R) == pytest.approx(3.0, abs=1e-6)
    t = np.array([1.0, 0, 0])
    assert translation_angle_error(np.array([1.0, 1.0, 0]), t) == pytest.approx(45.0)
    assert translation_angle_error(-t, t) == pytest.approx(0.0)  # sign ignored (SuperGlue)
    assert translation_angle_error(-t, t, symmetric=False) == pytest.approx(180.0)


def _two_view(R, t, K0, K1, n=300, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform([-3, -2, 4], [3, 2, 10], (n, 3))

    def project(K, P):
        p = P @ K.T
        return p[:, :2] / p[:, 2:]

    p0 = project(K0, X) + rng.normal(0, noise, (n, 2))
    p1 = project(K1, X @ R.T + t) + rng.normal(0, noise, (n, 2))
    return p0, p1


def test_relative_pose_synthetic():
    R = _rot([0.2, 1.0, 0.1], 12)
    t = np.array([0.8, -0.1, 0.25])
    K0 = np.array([[520.0, 0, 319.5], [0, 515.0, 239.5], [0, 0, 1]])
    K1 = np.array([[480.0, 0, 330.0], [0, 482.0, 250.0], [0, 0, 1]])
    p0, p1 = _two_view(R, t, K0, K1)
    rng = np.random.default_rng(5)
    out = rng.random(len(p0)) < 0.25
    p1[out] = rng.uniform([0, 0], [640, 480], (out.sum(), 2))
    res = estimate_relative_pose(p0, p1, K0, K1, threshold=1.5)
    assert res.success
    err_R, err_t = pose_error(res, R, t)
    assert err_R < 1.0 and err_t < 2.0
    assert np.linalg.norm(res.t) == pytest.approx(1.0)
    assert (res.inliers & ~out).sum() >= 0.9 * (~out).sum()
    assert (res.inliers & out).sum() <= 0.05 * out.sum() + 2
    # the wrong K (off by a lot) gives a worse pose: K is really used
    K_bad = K0 * np.array([[2.0], [2.0], [1.0]])
    bad = estimate_relative_pose(p0, p1, K_bad, K_bad, threshold=1.5)
    assert not bad.success or pose_error(bad, R, t)[0] > err_R


def test_relative_pose_degenerate():
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    rng = np.random.default_rng(0)
    for p0, p1 in [(np.zeros((0, 2)), np.zeros((0, 2))),
                   (rng.random((4, 2)), rng.random((4, 2))),
                   (np.c_[np.arange(30.0), np.arange(30.0)], np.c_[np.arange(30.0), np.zeros(30)]),
                   (np.full((10, 2), np.inf), rng.random((10, 2)))]:
        res = estimate_relative_pose(p0, p1, K, K)
        assert not res.success and res.R is None and res.reason
        assert pose_error(res, np.eye(3), np.ones(3)) == (float("inf"), float("inf"))
