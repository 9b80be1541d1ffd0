"""Retrieval pairs: each image with its ``k`` most similar images under a global descriptor.

Global descriptors (all L2-normalised, compared by cosine similarity):

- ``vlad`` (default with a features file): VLAD of the image's stored local descriptors
  (Jégou et al. 2010) over a small codebook learnt by k-means on the descriptors of the images
  being paired (no training data, deterministic seed). Per cluster the residuals
  ``d - c_k`` of the assigned L2-normalised descriptors are summed, each cluster block is
  L2-normalised ("intra-normalisation", Arandjelović & Zisserman 2013), then the whole vector
  gets a signed square root and a final L2 normalisation. Size ``num_clusters * D``.
- ``mean``: the mean of the L2-normalised local descriptors, centred by subtracting the mean
  over the images being paired, signed square root, L2. Cheap, weaker than VLAD.
- ``tiny`` (the classical fallback, needs no features): a 32 x 32 grey thumbnail, zero-mean
  and L2-normalised (Torralba et al. 2008), concatenated with a 4 x 4 x 4 RGB colour
  histogram (Hellinger-normalised), each half weighted 1/sqrt(2).

Pairs are unordered and unique: image i with its top-k neighbours, in the order of ``names``,
a pair found from both ends kept once. With ``k >= len(names) - 1`` this is exhaustive matching.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from .errors import DiftSfmError, FormatError
from .formats.features import FeaturesReader
from .images import read_image
from .progress import progress

logger = logging.getLogger("dift_sfm")

METHODS = ("vlad", "mean", "tiny")
#: retrieval pairs: each image with this many most similar others
NUM_NEIGHBORS = 10


def default_method(feature_path: Path | str | None) -> str:
    """``vlad`` of the local descriptors when there is a features file, else ``tiny``."""
    return "vlad" if feature_path is not None else "tiny"


def _l2(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _signed_sqrt(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.sqrt(np.abs(x))


def read_all_descriptors(feature_path: Path | str, names: list[str]) -> list[np.ndarray]:
    """(N_i, D) float32 L2-normalised local descriptors of each image (one file open)."""
    feature_path = Path(feature_path)
    with FeaturesReader(feature_path) as features:
        out = [_l2(features.descriptors(name)) for name in names]
    dims = {d.shape[1] for d in out}
    if len(dims) > 1:
        raise FormatError(f"Features file {feature_path} mixes descriptor sizes {sorted(dims)}.")
    return out


def kmeans(x: np.ndarray, k: int, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """(k, D) centroids of the rows of ``x`` (N, D): k-means++ seeding, Lloyd iterations."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    sq = (x * x).sum(1)
    centres = [x[rng.integers(len(x))]]
    d2 = sq - 2 * x @ centres[0] + centres[0] @ centres[0]
    for _ in range(1, k):
        p = np.maximum(d2, 0)
        idx = rng.choice(len(x), p=p / p.sum()) if p.sum() > 0 else rng.integers(len(x))
        centres.append(x[idx])
        d2 = np.minimum(d2, sq - 2 * x @ x[idx] + x[idx] @ x[idx])
    c = np.stack(centres)
    for _ in range(iterations):
        assign = np.argmin((c * c).sum(1)[None] - 2 * x @ c.T, axis=1)
        new = np.stack([x[assign == j].mean(0) if np.any(assign == j) else c[j]
                        for j in range(len(c))])
        if np.allclose(new, c, atol=1e-6):
            break
        c = new
    return c.astype(np.float32)


def vlad_descriptors(descriptors: list[np.ndarray], num_clusters: int = 16, seed: int = 0,
                     samples_per_image: int = 512, max_samples: int = 50_000) -> np.ndarray:
    """(n, num_clusters * D) VLAD vectors of n images' (N_i, D) local descriptors."""
    rng = np.random.default_rng(seed)
    per_image = max(1, min(samples_per_image, max_samples // max(1, len(descriptors))))
    chunks = [d[rng.choice(len(d), min(len(d), per_image), replace=False)]
              for d in descriptors if len(d)]
    if not chunks:
        raise DiftSfmError("No local descriptors to build a VLAD codebook from.")
    sample = np.concatenate(chunks)
    centres = kmeans(sample, num_clusters, seed=seed)
    k, dim = centres.shape
    out = np.zeros((len(descriptors), k * dim), np.float32)
    for i, d in enumerate(descriptors):
        if not len(d):
            continue
        assign = np.argmin((centres * centres).sum(1)[None] - 2 * d @ centres.T, axis=1)
        v = np.zeros((k, dim), np.float32)
        np.add.at(v, assign, d - centres[assign])
        out[i] = _signed_sqrt(_l2(v).reshape(-1))
    return _l2(out)


def mean_descriptors(descriptors: list[np.ndarray]) -> np.ndarray:
    """(n, D) mean-pooled descriptors, centred over the images, signed square root, L2.

    Centring removes the component every image shares (with non-negative descriptors such as
    RootSIFT, the raw means are all nearly parallel).
    """
    means = np.stack([d.mean(0) if len(d) else np.zeros(d.shape[1], np.float32)
                      for d in descriptors])
    if len(means) > 2:
        means = means - means.mean(0, keepdims=True)
    return _l2(_signed_sqrt(means))


def tiny_image_descriptor(image: np.ndarray, size: int = 32, bins: int = 4) -> np.ndarray:
    """Thumbnail + colour histogram descriptor of one (H, W, 3) float image in [0, 1]."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    thumb = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).reshape(-1)
    thumb = _l2(thumb - thumb.mean())
    small = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
    q = np.clip((small * bins).astype(np.int64), 0, bins - 1).reshape(-1, 3)
    hist = np.bincount(q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2],
                       minlength=bins ** 3).astype(np.float32)
    hist = _l2(np.sqrt(hist / hist.sum()))
    return np.concatenate([thumb, hist]).astype(np.float32) / np.sqrt(2.0)


def global_descriptors(names: list[str], feature_path: Path | str | None = None,
                       image_dir: Path | str | None = None, method: str | None = None,
                       num_clusters: int = 16) -> np.ndarray:
    """(n, G) L2-normalised global descriptors of ``names`` (see the module docstring)."""
    method = method or default_method(feature_path)
    if method not in METHODS:
        raise DiftSfmError(f"Unknown retrieval method '{method}'; choose one of "
                           f"{', '.join(METHODS)}.")
    if method == "tiny":
        if image_dir is None:
            raise DiftSfmError("Retrieval method 'tiny' needs the image directory.")
        return np.stack([tiny_image_descriptor(read_image(Path(image_dir) / n))
                         for n in progress(names, desc="retrieval", unit="img",
                                       disable=len(names) < 50)])
    if feature_path is None:
        raise DiftSfmError(f"Retrieval method '{method}' needs a features file (--features).")
    descriptors = read_all_descriptors(feature_path, names)
    if method == "mean":
        return mean_descriptors(descriptors)
    return vlad_descriptors(descriptors, num_clusters)


def pairs_from_descriptors(names: list[str], descriptors: np.ndarray,
                           num_neighbors: int) -> list[tuple[str, str]]:
    """Unique unordered pairs: each image with its ``num_neighbors`` most similar others."""
    if num_neighbors < 1:
        raise DiftSfmError(f"num_neighbors must be at least 1, got {num_neighbors}.")
    if len(names) != len(descriptors):
        raise ValueError("one descriptor per name")
    sim = descriptors @ descriptors.T
    np.fill_diagonal(sim, -np.inf)
    k = min(num_neighbors, len(names) - 1)
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    for i in range(len(names)):
        for j in np.argsort(-sim[i], kind="stable")[:k]:
            key = (min(i, int(j)), max(i, int(j)))
            if key not in seen:
                seen.add(key)
                pairs.append((names[i], names[int(j)]))
    return pairs


def retrieval_pairs(names: list[str], num_neighbors: int = NUM_NEIGHBORS,
                    feature_path: Path | str | None = None, image_dir: Path | str | None = None,
                    method: str | None = None) -> list[tuple[str, str]]:
    """Retrieval pairs of ``names``: VLAD of ``feature_path`` descriptors by default, the
    ``tiny`` image descriptor from ``image_dir`` when no features file is given."""
    if len(names) < 2:
        return []
    desc = global_descriptors(names, feature_path, image_dir, method)
    pairs = pairs_from_descriptors(names, desc, num_neighbors)
    logger.info("Retrieval (%s, k=%d): %d pairs of %d images.",
                method or default_method(feature_path), num_neighbors,
                len(pairs), len(names))
    return pairs
