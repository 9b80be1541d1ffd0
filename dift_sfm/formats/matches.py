"""matches.h5 in hloc's layout.

Pair key ``name0.replace('/', '-') + '/' + name1.replace('/', '-')`` (older files join with
``_``); each pair is stored once, in either orientation. Datasets: ``matches0`` (N0,) int32,
index into image 1's keypoints or -1; ``matching_scores0`` (N0,) float32.
Provenance (dift-sfm only; hloc ignores attributes): each pair group's attributes
``features0``/``features1`` hold the fingerprints (``FeaturesReader.fingerprint``) of the two
images' features it was computed from, in stored order; the root attribute ``matcher_json``
holds the matcher settings.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import FormatError
from .h5store import H5Reader


def key_name(name: str) -> str:
    """An image name as it appears in hloc's pair keys: '/' becomes '-' (so ``a/b.jpg`` and
    ``a-b.jpg`` share keys; ``images.check_image_names`` refuses such names up front)."""
    return name.replace("/", "-")


def pair_key(name0: str, name1: str, separator: str = "/") -> str:
    """hloc's key of the pair (name0, name1)."""
    return key_name(name0) + separator + key_name(name1)


def is_complete_matches(group: h5py.Group) -> bool:
    """True if ``group`` holds a complete pair entry."""
    try:
        m = group["matches0"]
        return m.ndim == 1 and group["matching_scores0"].shape == m.shape
    except (KeyError, TypeError, AttributeError):
        return False


def find_pair(f: h5py.File, name0: str, name1: str) -> tuple[str, bool] | None:
    """(key, reversed) of the pair in an open file, any orientation, new or old keys."""
    for sep in ("/", "_"):
        for a, b, rev in ((name0, name1, False), (name1, name0, True)):
            key = pair_key(a, b, sep)
            if key in f and isinstance(f[key], h5py.Group) and is_complete_matches(f[key]):
                return key, rev
    return None


def check_pair_keys(pairs: list[tuple[str, str]], source: str = "the pairs") -> None:
    """Refuse pairs whose hloc keys collide (names differing only by '/' vs '-')."""
    from ..images import check_image_names

    check_image_names(dict.fromkeys(n for p in pairs for n in p), source)


def match_attrs(fingerprint0: str, fingerprint1: str) -> dict[str, str]:
    """Attributes of one pair entry: the features it was computed from (stored order)."""
    return {"features0": fingerprint0, "features1": fingerprint1}


def match_datasets(matches0: np.ndarray, scores0: np.ndarray) -> dict[str, np.ndarray]:
    """Datasets of one pair entry: matches0 as int32 (hloc's int16 overflows past 32767)."""
    return {"matches0": np.asarray(matches0, np.int32).reshape(-1),
            "matching_scores0": np.asarray(scores0, np.float32).reshape(-1)}


def matches_in(f: h5py.File, name0: str, name1: str,
               path: Path | str = "") -> tuple[np.ndarray, np.ndarray, bool, int]:
    """Matches of a pair in an open file, any orientation, new or old keys.

    Returns (M, 2) int64 indices into name0's and name1's keypoints, (M,) float32 scores,
    whether the pair is stored as (name1, name0), and the length of the stored ``matches0``
    (the keypoint count of the image stored first).
    """
    found = find_pair(f, name0, name1)
    if found is None:
        raise FormatError(f"Pair ({name0}, {name1}) is not in matches file {path} "
                          f"(key '{pair_key(name0, name1)}'): match it first (`dift-sfm match`).")
    key, rev = found
    m0 = f[key]["matches0"][()].astype(np.int64).reshape(-1)
    s0 = f[key]["matching_scores0"][()].astype(np.float32).reshape(-1)
    idx = np.flatnonzero(m0 > -1)
    matches = np.stack([idx, m0[idx]], -1)
    if rev:
        matches = matches[:, ::-1]
    return np.ascontiguousarray(matches), s0[idx], rev, len(m0)


def read_matches(path: Path | str, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """Matches of a pair: ((M, 2) int64 indices into name0's and name1's keypoints, (M,) scores).

    Works whichever orientation the pair was stored in, with new ('/') or old ('_') keys.
    """
    with MatchesReader(path) as f:
        return f.matches(name0, name1)


class MatchesReader(H5Reader):
    """Read access to a matches.h5 (or a shard of one) that keeps the file open."""

    def has(self, name0: str, name1: str) -> bool:
        """Whether the pair is stored (either orientation, new or old keys)."""
        return find_pair(self.file, name0, name1) is not None

    def matches(self, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
        """((M, 2) int64 indices into name0's and name1's keypoints, (M,) float32 scores)."""
        matches, scores, _, _ = matches_in(self.file, name0, name1, self.path)
        return matches, scores

    def provenance(self, name0: str, name1: str) -> tuple[str, str] | None:
        """Fingerprints of (name0's, name1's) features the stored pair came from; None when the
        pair is absent or records none (written by hloc or an older dift-sfm)."""
        found = find_pair(self.file, name0, name1)
        if found is None:
            return None
        attrs = self.file[found[0]].attrs
        if "features0" not in attrs or "features1" not in attrs:
            return None
        fp = (str(attrs["features0"]), str(attrs["features1"]))
        return (fp[1], fp[0]) if found[1] else fp
