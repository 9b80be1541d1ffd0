"""RootSIFT descriptors from OpenCV: the classical, weight-free baseline."""

from __future__ import annotations

import cv2
import numpy as np

from .base import Featurizer


def opencv_octaves(sizes: np.ndarray, layers: int = 3, sigma: float = 1.6) -> np.ndarray:
    """OpenCV's packed ``KeyPoint.octave`` (octave | layer << 8) for keypoint diameters.

    OpenCV computes a SIFT descriptor on the pyramid level named by ``octave``; a keypoint made
    with octave 0 is described on the sharp full-resolution image whatever its size, which
    degrades matching badly. OpenCV's detector gives a keypoint of octave o (first octave -1:
    the doubled image) and layer l the diameter ``sigma * 2 ** (o + 1 + l / layers)``; this
    inverts that, clamped to the levels OpenCV accepts (o >= -1, 1 <= l <= layers).
    """
    n = np.round(layers * np.log2(np.maximum(sizes, 1e-6) / sigma)).astype(np.int64)
    n = np.maximum(n, 1)
    octv = (n - 1) // layers  # octave counted from the doubled image
    layer = n - layers * octv
    return ((octv - 1) & 255) | (layer << 8)


class SIFT(Featurizer):
    """OpenCV SIFT descriptors at given keypoints, RootSIFT-normalised by default.

    Keypoints with a size/orientation (from the DoG detector) use them; others (grid, Harris,
    imported) get ``default_size`` and an upright orientation.
    """

    descriptor_dim = 128
    default_conf = {
        "name": "sift",
        "batch_size": 1,        # images per describe_batch call of the extraction loop
        "root": True,           # RootSIFT (L1, sqrt) before the final L2 normalisation
        "default_size": 12.0,   # keypoint diameter (px) for keypoints without a size
    }

    def describe(self, image: np.ndarray, keypoints: np.ndarray, sizes: np.ndarray | None = None,
                 angles: np.ndarray | None = None, **_: object) -> np.ndarray:
        n = len(keypoints)
        out = np.zeros((n, 128), np.float32)
        if n == 0:
            return out
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        gray = np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
        size = np.full(n, self.conf["default_size"], np.float32) if sizes is None else sizes
        angle = np.zeros(n, np.float32) if angles is None else angles
        octaves = opencv_octaves(np.asarray(size, np.float64))
        cv_kpts = [cv2.KeyPoint(float(x), float(y), float(s), float(a), 0.0, int(o), i)
                   for i, ((x, y), s, a, o)
                   in enumerate(zip(keypoints, size, angle, octaves, strict=True))]
        cv_kpts, desc = cv2.SIFT_create().compute(gray, cv_kpts)
        if desc is None:
            return out
        # OpenCV may drop keypoints; class_id carries the original index back.
        ids = np.array([k.class_id for k in cv_kpts], np.int64)
        desc = desc.astype(np.float32)
        if self.conf["root"]:
            desc /= np.maximum(desc.sum(1, keepdims=True), 1e-8)  # L1
            desc = np.sqrt(desc)
        desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-8)
        out[ids] = desc
        return out
