"""Optional PCA reduction of the descriptors of a features.h5, fitted per image set.

Any featurizer's descriptors can be reduced (e.g. 512-d DIFT-ADM to 128-d) to shrink the file
and speed up matching. The basis is fitted once on a sample of the file's descriptors and kept
in the file's root attributes (``pca_mean`` (D,), ``pca_components`` (dim, D)); each reduced
image group gets the attribute ``pca_dim``. Reduced descriptors are re-L2-normalised.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import logger
from .errors import FormatError
from .formats.features import FeaturesReader, is_complete_features
from .formats.h5store import ShardedH5Writer

#: The ``pca`` conf section at its defaults: ``dim`` None = no reduction.
default_conf = {"dim": None}

MEAN_ATTR = "pca_mean"
COMPONENTS_ATTR = "pca_components"
REDUCED_ATTR = "pca_dim"


def fit_pca(descriptors: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Principal axes of ``descriptors`` (M, D).

    Returns ``mean`` (D,) and ``components`` (dim, D), both float32: orthonormal rows by
    decreasing variance, each row's sign fixed so that its largest-magnitude entry is positive
    (the same data always gives the same basis).
    """
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"Expected descriptors (M, D) with M > 0, got shape {x.shape}.")
    if not 0 < dim <= x.shape[1]:
        raise ValueError(f"PCA dim must be in [1, {x.shape[1]}], got {dim}.")
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / x.shape[0]
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    comps = vecs[:, ::-1][:, :dim].T
    rows = np.arange(dim)
    comps *= np.sign(comps[rows, np.abs(comps).argmax(1)])[:, None]
    return mean.astype(np.float32), np.ascontiguousarray(comps, dtype=np.float32)


def project(descriptors: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Project (N, D) descriptors onto ``components`` (dim, D) -> (N, dim) float32, unit rows."""
    y = (np.asarray(descriptors, np.float32) - mean) @ components.T
    norm = np.linalg.norm(y, axis=1, keepdims=True)
    return (y / np.maximum(norm, 1e-12)).astype(np.float32)


def _sample(features: FeaturesReader, names: list[str], max_samples: int,
            seed: int) -> np.ndarray:
    """Up to ``max_samples`` descriptors (M, D), drawn uniformly over all of ``names``."""
    counts = np.array([features.descriptors_shape(n)[0] for n in names])
    total = int(counts.sum())
    keep = np.arange(total)
    if total > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(total, max_samples, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for name, s, e in zip(names, starts[:-1], starts[1:], strict=True):
        idx = keep[(keep >= s) & (keep < e)] - s
        if len(idx):
            parts.append(features.descriptors(name)[idx])
    return np.concatenate(parts)


def reduce_features_file(feature_path: str | os.PathLike, dim: int | None,
                         max_samples: int = 100_000, seed: int = 0,
                         names: list[str] | None = None) -> Path:
    """Reduce every descriptor in an hloc features.h5 to ``dim`` dimensions with PCA.

    Contract with the extract step: after ``extract_features`` has written ``feature_path``,
    it calls ``reduce_features_file(feature_path, conf["pca"]["dim"], names=...)``; ``dim``
    None means no PCA and returns at once. Only ``descriptors`` change, to (dim, N), same float
    dtype, L2-normalised columns, and the group gets attribute ``pca_dim``.

    The basis is fitted on up to ``max_samples`` descriptors drawn uniformly from all entries
    (seeded), or, if the file's root attributes already hold one, reused: a re-run after new
    images were added projects only the entries without ``pca_dim``, with the same basis.

    ``names``: the entries to look at (default: every entry of the file). ``extract`` passes
    the images it was asked for, so that adding images to a large reduced file costs what is
    added, not a walk over the whole file.

    The reduced entries go through ``formats.h5store.ShardedH5Writer`` (appended under its redo
    journal, or a rewrite when they replace most of the file; a crash leaves the old file or
    resumable shards).

    Raises FormatError if the file holds a basis of another ``dim`` or mixes descriptor sizes.
    """
    path = Path(feature_path)
    if dim is None:
        return path
    if not path.is_file():
        raise FormatError(f"Features file {path} does not exist: run the extract step first.")
    dim = int(dim)
    with FeaturesReader(path) as f:
        names = f.names if names is None else [n for n in dict.fromkeys(names) if n in f]
        todo = [n for n in names if REDUCED_ATTR not in f.entry_attrs(n)]
        has_basis = COMPONENTS_ATTR in f.attrs
        if has_basis:
            mean, components = f.attrs[MEAN_ATTR], f.attrs[COMPONENTS_ATTR]
            if components.shape[0] != dim:
                raise FormatError(
                    f"{path} already holds descriptors reduced by PCA to {components.shape[0]} "
                    f"dimensions, not {dim}: use pca.dim={components.shape[0]} or extract again "
                    f"with overwrite.")
        elif len(todo) < len(names):
            raise FormatError(f"{path} has groups marked '{REDUCED_ATTR}' but no PCA basis in its "
                              f"root attributes: extract again with overwrite.")
        if not todo:
            return path
        dims = {f.descriptors_shape(n)[1] for n in todo}
        if len(dims) > 1:
            raise FormatError(f"{path} mixes descriptor sizes {sorted(dims)}: cannot reduce.")
        d = dims.pop()
        if has_basis and components.shape[1] != d:
            raise FormatError(f"{path}: the stored PCA basis expects {components.shape[1]}-d "
                              f"descriptors but new groups have {d}: extract again with overwrite.")
        if not has_basis:
            if dim >= d:
                raise FormatError(f"pca.dim={dim} must be smaller than the descriptor size {d} "
                                  f"of {path}.")
            sample = _sample(f, todo, max_samples, seed)
            mean, components = fit_pca(sample, dim)
            logger.info("PCA %d -> %d fitted on %d descriptors of %s.", d, dim, len(sample), path)
        writer = ShardedH5Writer(path, is_complete_features,
                                 {MEAN_ATTR: mean, COMPONENTS_ATTR: components})
        try:
            for name in todo:
                data = f.datasets(name)
                desc = data["descriptors"]  # (D, N)
                dtype = desc.dtype if np.issubdtype(desc.dtype, np.floating) else np.float32
                data["descriptors"] = project(desc.T, mean, components).T.astype(dtype)
                writer.write(name, data, {**f.entry_attrs(name), REDUCED_ATTR: dim})
        except BaseException:
            writer.close()
            raise
    try:
        writer.finalize()
    except BaseException:
        writer.close()
        raise
    logger.info("Reduced the descriptors of %d images in %s to %d dimensions.",
                len(todo), path, dim)
    return path
