"""Match plots."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import texture

from dift_sfm.viz import plot_matches

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(n: int = 30):
    rng = np.random.default_rng(0)
    img0, img1 = texture(80, 120, seed=0), texture(100, 90, seed=1)[..., 0]  # RGB + gray
    k0 = rng.uniform([0, 0], [119, 79], (n, 2))
    k1 = rng.uniform([0, 0], [89, 99], (n + 5, 2))
    matches = np.stack([np.arange(n), rng.permutation(n + 5)[:n]], axis=1)
    return img0, img1, k0, k1, matches


def test_plot_matches_writes_png(tmp_path):
    img0, img1, k0, k1, matches = _data()
    inliers = np.arange(len(matches)) % 3 == 0
    out = plot_matches(img0, img1, k0, k1, matches, tmp_path / "sub" / "m.png",
                       inliers=inliers, title="pair")
    data = out.read_bytes()
    assert out.is_file() and data[:8] == PNG_MAGIC
    import matplotlib.image as mpimg

    png = mpimg.imread(out)
    assert png.shape[1] == 120 + 90 and png.shape[0] >= 100
    assert png.std() > 0.01  # the images were drawn


def test_plot_matches_no_inliers_and_empty(tmp_path):
    img0, img1, k0, k1, _ = _data()
    out = plot_matches(img0.astype(np.float32) / 255, img1, k0, k1, np.zeros((0, 2), int),
                       tmp_path / "empty.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="inliers"):
        plot_matches(img0, img1, k0, k1, np.array([[0, 1]]), tmp_path / "x.png",
                     inliers=np.array([True, False]))
