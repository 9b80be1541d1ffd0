"""Optional PCA reduction of the descriptors of a features.h5, fitted per image set.

Any featurizer's descriptors can be reduced (e.g. 512-d DIFT-ADM to 128-d) to shrink the file
and speed up matching. The basis is fitted once on a sample of the file's descriptors and kept
in the file's root attributes (``pca_mean`` (D,), ``pca_components`` (dim, D)); each reduced
image group gets the attribute ``pca_dim``. Reduced descriptors are re-L2-normalised.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from . import logger
from .errors import FormatError

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


def _descriptor_groups(f: h5py.File) -> list[str]:
    """Names (no leading '/') of every group holding a ``descriptors`` dataset, nested included."""
    names: list[str] = []

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] == "descriptors":
            names.append(obj.parent.name.strip("/"))

    f.visititems(visit)
    return names


def _sample(f: h5py.File, groups: list[str], max_samples: int, seed: int) -> np.ndarray:
    """Up to ``max_samples`` descriptors (M, D), drawn uniformly over all of ``groups``."""
    counts = np.array([f[g]["descriptors"].shape[1] for g in groups])
    total = int(counts.sum())
    keep = np.arange(total)
    if total > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(total, max_samples, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for g, s, e in zip(groups, starts[:-1], starts[1:], strict=True):
        idx = keep[(keep >= s) & (keep < e)] - s
        if len(idx):
            parts.append(f[g]["descriptors"][()][:, idx].T.astype(np.float32))
    return np.concatenate(parts)


def _copy(src: h5py.Group, dst: h5py.Group, todo: set[str], mean: np.ndarray,
          components: np.ndarray) -> None:
    """Copy ``src`` into ``dst`` recursively, projecting the descriptors of groups in ``todo``."""
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    project_here = src.name.strip("/") in todo
    for name, obj in src.items():
        if isinstance(obj, h5py.Group):
            _copy(obj, dst.create_group(name), todo, mean, components)
        elif project_here and name == "descriptors":
            desc = obj[()]  # (D, N)
            dtype = desc.dtype if np.issubdtype(desc.dtype, np.floating) else np.float32
            reduced = project(desc.T, mean, components).T.astype(dtype)
            dst.create_dataset(name, data=reduced, compression=obj.compression,
                               compression_opts=obj.compression_opts)
            for key, value in obj.attrs.items():
                dst[name].attrs[key] = value
            dst.attrs[REDUCED_ATTR] = components.shape[0]
        else:
            src.copy(obj, dst, name=name)


def reduce_features_file(feature_path: str | os.PathLike, dim: int | None,
                         max_samples: int = 100_000, seed: int = 0) -> Path:
    """Reduce every descriptor in an hloc features.h5 to ``dim`` dimensions with PCA.

    Contract with the extract step: after ``extract_features`` has written ``feature_path``,
    it calls ``reduce_features_file(feature_path, conf["pca"]["dim"])``; ``dim`` None means no
    PCA and returns at once. Groups are image names (nested by '/') with ``keypoints`` (N, 2),
    ``descriptors`` (D, N), ``scores``, ``image_size``; only ``descriptors`` change, to
    (dim, N), same float dtype, L2-normalised columns, and the group gets attribute ``pca_dim``.

    The basis is fitted on up to ``max_samples`` descriptors drawn uniformly from all groups
    (seeded), or, if the file's root attributes already hold one, reused: a re-run after new
    images were added projects only the groups without ``pca_dim``, with the same basis.

    The file is never modified in place: the result is written to a temporary file next to it
    and moved over it with ``os.replace``, so a crash leaves the old file intact.

    Raises FormatError if the file holds a basis of another ``dim`` or mixes descriptor sizes.
    """
    path = Path(feature_path)
    if dim is None:
        return path
    if not path.is_file():
        raise FormatError(f"Features file {path} does not exist: run the extract step first.")
    dim = int(dim)
    with h5py.File(path, "r") as f:
        groups = _descriptor_groups(f)
        todo = [g for g in groups if REDUCED_ATTR not in f[g].attrs]
        has_basis = COMPONENTS_ATTR in f.attrs
        if has_basis:
            mean, components = f.attrs[MEAN_ATTR], f.attrs[COMPONENTS_ATTR]
            if components.shape[0] != dim:
                raise FormatError(
                    f"{path} already holds descriptors reduced by PCA to {components.shape[0]} "
                    f"dimensions, not {dim}: use pca.dim={components.shape[0]} or extract again "
                    f"with overwrite.")
        elif len(todo) < len(groups):
            raise FormatError(f"{path} has groups marked '{REDUCED_ATTR}' but no PCA basis in its "
                              f"root attributes: extract again with overwrite.")
        if not todo:
            return path
        dims = {f[g]["descriptors"].shape[0] for g in todo}
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
        tmp = path.with_name(path.name + ".pca-tmp")
        try:
            # v1.8 format or later: needed for attributes over 64 KiB (the basis).
            with h5py.File(tmp, "w", libver=("v108", "v110")) as out:
                _copy(f, out, set(todo), mean, components)
                out.attrs[MEAN_ATTR] = mean
                out.attrs[COMPONENTS_ATTR] = components
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)
    logger.info("Reduced the descriptors of %d images in %s to %d dimensions.",
                len(todo), path, dim)
    return path
