"""Keypoint detectors: DoG (OpenCV SIFT), Harris/GFTT, a regular grid; and the options of
keypoints imported from an hloc features file (read by the extraction step, which owns file
access: ``dift_sfm.extract.import_keypoints``).

Every detector returns a :class:`Keypoints` in the coordinates of the image it was given:
(x, y), pixel centres at integer coordinates.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import DiftSfmError
from .geometry import scale_pixel_coords


@dataclass
class Keypoints:
    """Detected keypoints.

    Attributes:
        xy: (N, 2) float32 (x, y).
        scores: (N,) float32 detector responses (higher is better).
        sizes: (N,) float32 support diameter in pixels (for classical descriptors), or None.
        angles: (N,) float32 orientation in degrees, or None.
    """

    xy: np.ndarray
    scores: np.ndarray
    sizes: np.ndarray | None = None
    angles: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.xy)

    def scaled(self, scale: tuple[float, float]) -> Keypoints:
        """Map to a copy of the image resized by ``scale`` = (sx, sy) = new / old size:
        x' = (x + 0.5) * sx - 0.5 (``geometry.scale_pixel_coords``); sizes scale with the mean
        scale."""
        s = np.asarray(scale, np.float32)
        sizes = None if self.sizes is None else self.sizes * float(s.mean())
        xy = scale_pixel_coords(np.asarray(self.xy, np.float32), s)
        return Keypoints(xy, self.scores, sizes, self.angles)


def _to_uint8_gray(image: np.ndarray) -> np.ndarray:
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)


def top_k(kpts: Keypoints, k: int | None) -> Keypoints:
    """The ``k`` highest-scoring keypoints, strongest first (ties keep their order); all of
    them when ``k`` is None, 0 or at least their number."""
    if not k or k <= 0 or len(kpts) <= k:
        return kpts
    idx = np.argsort(-kpts.scores, kind="stable")[:k]
    pick = (lambda a: None if a is None else a[idx])  # noqa: E731
    return Keypoints(kpts.xy[idx], kpts.scores[idx], pick(kpts.sizes), pick(kpts.angles))


def detect_dog(image: np.ndarray, max_keypoints: int | None = 4096,
               contrast_threshold: float = 0.04 / 3, edge_threshold: float = 10.0,
               multi_orientation: bool = False) -> Keypoints:
    """Difference-of-Gaussians extrema (OpenCV's SIFT detector), strongest first.

    A location with several dominant orientations is kept once, unless ``multi_orientation``
    (then once per orientation, as COLMAP does: useful for orientation-dependent descriptors
    like SIFT, pure duplication for DIFT). OpenCV's keypoint coordinates already put pixel
    centres at integers.
    """
    sift = cv2.SIFT_create(contrastThreshold=contrast_threshold, edgeThreshold=edge_threshold)
    cv_kpts = sift.detect(_to_uint8_gray(image), None)
    if not cv_kpts:
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                         np.zeros(0, np.float32), np.zeros(0, np.float32))
    xy = np.array([k.pt for k in cv_kpts], np.float32)
    scores = np.array([k.response for k in cv_kpts], np.float32)
    sizes = np.array([k.size for k in cv_kpts], np.float32)
    angles = np.array([k.angle for k in cv_kpts], np.float32)
    kpts = Keypoints(xy, scores, sizes, angles)
    if not multi_orientation:  # one entry per location: the first (dominant) orientation
        _, first = np.unique(np.round(xy * 8).astype(np.int64), axis=0, return_index=True)
        first = np.sort(first)
        kpts = Keypoints(xy[first], scores[first], sizes[first], angles[first])
    return top_k(kpts, max_keypoints)


def detect_gftt(image: np.ndarray, max_keypoints: int | None = 4096, quality_level: float = 0.001,
                min_distance: float = 4.0, harris: bool = True, block_size: int = 3,
                size: float = 12.0) -> Keypoints:
    """Harris (or Shi-Tomasi) corners via OpenCV's goodFeaturesToTrack, strongest first."""
    gray = _to_uint8_gray(image)
    n = max_keypoints if max_keypoints and max_keypoints > 0 else 0
    corners = cv2.goodFeaturesToTrack(gray, maxCorners=n, qualityLevel=quality_level,
                                      minDistance=min_distance, blockSize=block_size,
                                      useHarrisDetector=harris, k=0.04)
    if corners is None:
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros(0, np.float32))
    xy = corners.reshape(-1, 2).astype(np.float32)
    response = (cv2.cornerHarris(gray.astype(np.float32), block_size, 3, 0.04) if harris
                else cv2.cornerMinEigenVal(gray.astype(np.float32), block_size))
    ix = np.clip(np.round(xy).astype(int), 0, [gray.shape[1] - 1, gray.shape[0] - 1])
    scores = response[ix[:, 1], ix[:, 0]].astype(np.float32)
    return top_k(Keypoints(xy, scores, np.full(len(xy), size, np.float32)), max_keypoints)


def detect_grid(image: np.ndarray, step: int = 16, max_keypoints: int | None = None,
                size: float = 16.0) -> Keypoints:
    """A regular grid with spacing ``step``, centred in the image; all scores are 1.

    If ``max_keypoints`` is smaller than the grid, the step grows until it fits.
    """
    h, w = image.shape[:2]
    step = max(1, int(step))
    while max_keypoints and (w // step) * (h // step) > max_keypoints:
        step += 1
    xs = np.arange(w // step) * step + (w - (w // step - 1) * step - 1) / 2
    ys = np.arange(h // step) * step + (h - (h // step - 1) * step - 1) / 2
    gx, gy = np.meshgrid(xs, ys)
    xy = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)
    return Keypoints(xy, np.ones(len(xy), np.float32), np.full(len(xy), size, np.float32))


DETECTORS = {"dog": detect_dog, "sift": detect_dog, "gftt": detect_gftt, "harris": detect_gftt,
             "grid": detect_grid}
#: Options of ``keypoints.name='import'``: ``path``, an hloc features.h5 whose keypoints (in
#: original pixels, scores when present) are used; ``max_keypoints``, the strongest kept.
IMPORT_DEFAULTS = {"path": None, "max_keypoints": None}
_FORCED = {"harris": {"harris": True}, "gftt": {"harris": False}}  # names that fix an option


def detector_defaults(name: str) -> dict:
    """The ``keypoints`` conf section of detector ``name`` with every option at its default.

    The defaults are the detector function's keyword defaults: they live in one place.
    """
    if name == "import":
        return {"name": name, **IMPORT_DEFAULTS}
    if name not in DETECTORS:
        raise DiftSfmError(f"Unknown keypoint detector '{name}'. "
                           f"Available: {', '.join([*DETECTORS, 'import'])}.")
    skip = {"image", "name"} | set(_FORCED.get(name, {}))
    params = inspect.signature(DETECTORS[name]).parameters.values()
    return {"name": name, **{p.name: p.default for p in params
                             if p.name not in skip and p.default is not inspect.Parameter.empty}}


def detect_keypoints(image: np.ndarray, conf: dict) -> Keypoints:
    """Run the detector named by ``conf['name']`` on ``image`` (H, W, 3) or (H, W) in [0, 1].

    Detector 'import' is not handled here (it reads a file by image name): see
    ``dift_sfm.extract.import_keypoints``.
    """
    name = conf.get("name", "dog")
    if name not in DETECTORS:
        raise DiftSfmError(f"Unknown keypoint detector '{name}'. "
                           f"Available: {', '.join(DETECTORS)}.")
    options = {k: v for k, v in conf.items() if k != "name"} | _FORCED.get(name, {})
    return DETECTORS[name](image, **options)
