"""Match plots: two images side by side, matches as lines (inliers green, outliers red)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 / float [0, 1] -> (H, W, 3) float in [0, 1]."""
    img = np.asarray(image)
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255
    img = np.clip(img.astype(np.float32), 0, 1)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


def plot_matches(image0: np.ndarray, image1: np.ndarray, kpts0: np.ndarray, kpts1: np.ndarray,
                 matches: np.ndarray, path: str | Path, inliers: np.ndarray | None = None,
                 title: str | None = None, dpi: int = 100, max_lines: int = 2000) -> Path:
    """Save a PNG of ``image0`` | ``image1`` with lines between matched keypoints.

    Args:
        image0, image1: (H, W, 3) or (H, W), uint8 or float in [0, 1].
        kpts0, kpts1: (N0, 2), (N1, 2) keypoints (x, y), pixel centres at integers.
        matches: (M, 2) index pairs into kpts0 and kpts1.
        path: output PNG (parent folders are created).
        inliers: optional (M,) bool: inliers are drawn green, outliers red; without it every
            line is drawn in one colour.
        title: optional figure title (the inlier count is appended when known).
        max_lines: at most this many lines are drawn (an even subsample), for readability.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    img0, img1 = _as_rgb(image0), _as_rgb(image1)
    (h0, w0), (h1, w1) = img0.shape[:2], img1.shape[:2]
    canvas = np.ones((max(h0, h1), w0 + w1, 3), np.float32)
    canvas[:h0, :w0], canvas[:h1, w0:] = img0, img1

    matches = np.asarray(matches, dtype=np.int64).reshape(-1, 2)
    p0 = np.asarray(kpts0, dtype=np.float64).reshape(-1, 2)[matches[:, 0]]
    p1 = np.asarray(kpts1, dtype=np.float64).reshape(-1, 2)[matches[:, 1]] + [w0, 0]
    if inliers is None:
        colors = np.tile([0.1, 0.6, 1.0, 0.8], (len(matches), 1))
    else:
        inliers = np.asarray(inliers, dtype=bool).reshape(-1)
        if len(inliers) != len(matches):
            raise ValueError(f"inliers has {len(inliers)} entries for {len(matches)} matches.")
        colors = np.where(inliers[:, None], [0.1, 0.8, 0.1, 0.8], [0.9, 0.1, 0.1, 0.6])
    if len(matches) > max_lines:
        keep = np.linspace(0, len(matches) - 1, max_lines).astype(int)
        p0, p1, colors = p0[keep], p1[keep], colors[keep]

    height, width = canvas.shape[:2]
    fig = plt.figure(figsize=(width / dpi, height / dpi + (0.4 if title else 0)), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, height / (height + (0.4 * dpi if title else 0))))
    ax.imshow(canvas, interpolation="nearest")
    ax.add_collection(LineCollection(np.stack([p0, p1], axis=1), colors=colors, linewidths=0.8))
    ax.scatter(np.r_[p0[:, 0], p1[:, 0]], np.r_[p0[:, 1], p1[:, 1]], s=2,
               c=np.r_[colors, colors][:, :3])
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    if title is not None or inliers is not None:
        text = title or ""
        if inliers is not None:
            text += f"{'  ' if text else ''}{int(inliers.sum())}/{len(inliers)} inliers"
        fig.suptitle(text, fontsize=10, y=1 - 0.2 / (height / dpi + 0.4), va="center")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path
