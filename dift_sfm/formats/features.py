"""features.h5 in hloc's layout.

One group per image name (relative POSIX path; '/' nests groups) holding only numeric datasets:
``keypoints`` (N, 2) float32 (x, y) in original pixels, pixel centres at integers;
``descriptors`` (D, N); ``scores`` (N,); ``image_size`` (2,) int = (W, H) of the original image.
Metadata (the conf that wrote the file, descriptor size) lives in root attributes.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import FormatError
from .h5store import iter_entries, open_h5


def is_complete_features(group: h5py.Group) -> bool:
    """True if ``group`` is a whole image entry with consistent shapes."""
    try:
        kpts, desc = group["keypoints"], group["descriptors"]
        n = kpts.shape[0]
        return (kpts.ndim == 2 and kpts.shape[1] == 2 and desc.ndim == 2 and desc.shape[1] == n
                and group["scores"].shape == (n,) and group["image_size"].shape == (2,))
    except (KeyError, TypeError, AttributeError):
        return False


def feature_datasets(keypoints: np.ndarray, descriptors: np.ndarray, scores: np.ndarray,
                     image_size: tuple[int, int], as_half: bool = False) -> dict[str, np.ndarray]:
    """The datasets of one image entry; ``descriptors`` is (N, D) here and stored (D, N)."""
    desc = np.ascontiguousarray(np.asarray(descriptors, np.float32).T)
    return {
        "keypoints": np.asarray(keypoints, np.float32).reshape(-1, 2),
        "descriptors": desc.astype(np.float16) if as_half else desc,
        "scores": np.asarray(scores, np.float32).reshape(-1),
        "image_size": np.asarray(image_size, np.int64).reshape(2),
    }


def list_names(path: Path | str) -> list[str]:
    """Names of the complete image entries of a features file (sorted)."""
    if not Path(path).exists():
        return []
    with open_h5(path) as f:
        return sorted(iter_entries(f, is_complete_features))


def read_dataset(path: Path | str, name: str, dataset: str) -> np.ndarray:
    """One dataset of an image entry, as stored (other datasets may be absent, e.g. a
    keypoints-only file written by another tool)."""
    with open_h5(path) as f:
        if name not in f or not isinstance(f[name], h5py.Group):
            raise FormatError(f"Image '{name}' is not in features file {path}.")
        if dataset not in f[name]:
            raise FormatError(f"Entry '{name}' of features file {path} has no '{dataset}'.")
        return f[name][dataset][()]


def read_keypoints(path: Path | str, name: str) -> np.ndarray:
    """(N, 2) float32 keypoints (x, y) of image ``name``, original pixels."""
    return read_dataset(path, name, "keypoints").astype(np.float32)


def read_descriptors(path: Path | str, name: str) -> np.ndarray:
    """(N, D) float32 descriptors of image ``name`` (stored (D, N))."""
    return read_dataset(path, name, "descriptors").T.astype(np.float32)


def read_scores(path: Path | str, name: str) -> np.ndarray:
    """(N,) float32 keypoint scores of image ``name``."""
    return read_dataset(path, name, "scores").astype(np.float32)


def read_image_size(path: Path | str, name: str) -> tuple[int, int]:
    """(W, H) of the original image ``name``."""
    w, h = read_dataset(path, name, "image_size")
    return int(w), int(h)


def read_root_attrs(path: Path | str) -> dict:
    """Root attributes (conf name, descriptor size, ...) of a features file, {} if absent."""
    if not Path(path).exists():
        return {}
    with open_h5(path) as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_conf_name(path: Path | str) -> str | None:
    """The name of the conf that wrote a features file, or None (e.g. written by hloc)."""
    name = read_root_attrs(path).get("conf")
    return str(name) if name else None
