"""Tests of the PCA reduction of descriptors in hloc features.h5 files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dift_sfm import pca
from dift_sfm.errors import FormatError
from dift_sfm.pca import fit_pca, project, reduce_features_file

D = 48


def _descriptors(rng: np.random.Generator, n: int, rank: int = 6) -> np.ndarray:
    """(N, D) unit descriptors that mostly live in a fixed ``rank``-d subspace, plus noise."""
    basis = np.random.default_rng(123).standard_normal((rank, D))
    x = rng.standard_normal((n, rank)) @ basis + 0.01 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_image(f: h5py.File, name: str, desc: np.ndarray, dtype=np.float16) -> None:
    g = f.create_group(name)  # '/' in the name nests groups, as hloc does
    n = len(desc)
    g.create_dataset("keypoints", data=np.arange(2 * n, dtype=np.float32).reshape(n, 2))
    g.create_dataset("descriptors", data=desc.T.astype(dtype))
    g.create_dataset("scores", data=np.linspace(0, 1, n, dtype=np.float32))
    g.create_dataset("image_size", data=np.array([640, 480]))
    g.attrs["featurizer"] = "test"


@pytest.fixture
def features(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    descs = {"a.jpg": _descriptors(rng, 300), "seq/b.jpg": _descriptors(rng, 200),
             "seq/deep/c.png": _descriptors(rng, 150)}
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        for name, d in descs.items():
            _write_image(f, name, d)
        f.attrs["conf"] = "dift-adm"
    return path, descs


def test_fit_pca_recovers_subspace():
    rng = np.random.default_rng(1)
    x = _descriptors(rng, 2000)
    mean, comps = fit_pca(x, 6)
    assert mean.shape == (D,) and comps.shape == (6, D) and comps.dtype == np.float32
    np.testing.assert_allclose(comps @ comps.T, np.eye(6), atol=1e-5)
    # Same subspace as the top right-singular vectors of the centred data.
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.linalg.svd(comps @ vt[:6].T)[1], 1, atol=1e-4)
    # Six components keep almost all of the variance.
    xc = x - mean
    kept = np.linalg.norm(xc @ comps.T) ** 2 / np.linalg.norm(xc) ** 2
    assert kept > 0.99
    # Deterministic, independent of row order.
    mean2, comps2 = fit_pca(x[::-1], 6)
    np.testing.assert_allclose(comps2, comps, atol=1e-5)
    with pytest.raises(ValueError):
        fit_pca(x, D + 1)


def test_project_unit_rows():
    rng = np.random.default_rng(2)
    x = _descriptors(rng, 50)
    mean, comps = fit_pca(x, 8)
    y = project(x, mean, comps)
    assert y.shape == (50, 8)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, rtol=1e-5)
    assert project(np.zeros((0, D), np.float32), mean, comps).shape == (0, 8)


def test_reduce_features_file(features):
    path, descs = features
    assert reduce_features_file(path, 8) == path
    assert not path.with_name(path.name + ".pca-tmp").exists()
    with h5py.File(path, "r") as f:
        mean, comps = f.attrs["pca_mean"], f.attrs["pca_components"]
        assert comps.shape == (8, D) and f.attrs["conf"] == "dift-adm"
        for name, d in descs.items():
            g = f[name]
            assert g.attrs["pca_dim"] == 8 and g.attrs["featurizer"] == "test"
            red = g["descriptors"][()]
            assert red.shape == (8, len(d)) and red.dtype == np.float16
            # Columns are the projections with the stored basis, re-normalised.
            expected = project(d.astype(np.float16).astype(np.float32), mean, comps)
            np.testing.assert_allclose(red.T.astype(np.float32), expected, atol=2e-3)
            np.testing.assert_allclose(np.linalg.norm(red.astype(np.float32), axis=0), 1,
                                       atol=2e-3)
            np.testing.assert_array_equal(g["keypoints"][()].shape, (len(d), 2))
            np.testing.assert_array_equal(g["image_size"][()], [640, 480])
    # Nearest neighbours survive the reduction (data is nearly 6-dimensional).
    a = descs["a.jpg"]
    with h5py.File(path, "r") as f:
        ra = f["a.jpg"]["descriptors"][()].T.astype(np.float32)
    nn_full = np.argsort(-(a @ a.T), axis=1)[:, 1]
    nn_red = np.argsort(-(ra @ ra.T), axis=1)[:, 1]
    assert (nn_full == nn_red).mean() > 0.8


def test_rerun_projects_only_new_groups(features):
    path, _ = features
    reduce_features_file(path, 8)
    with h5py.File(path, "r") as f:
        before = f["seq/b.jpg"]["descriptors"][()]
        comps = f.attrs["pca_components"]
    reduce_features_file(path, 8)  # nothing new: a no-op
    new = _descriptors(np.random.default_rng(5), 40)
    with h5py.File(path, "a") as f:  # an extraction run adds an image
        _write_image(f, "seq/new.jpg", new, dtype=np.float32)
    reduce_features_file(path, 8, max_samples=50)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["seq/b.jpg"]["descriptors"][()], before)
        np.testing.assert_array_equal(f.attrs["pca_components"], comps)
        red = f["seq/new.jpg"]["descriptors"][()]
        assert red.shape == (8, 40) and red.dtype == np.float32
        np.testing.assert_allclose(red.T, project(new, f.attrs["pca_mean"], comps), atol=1e-6)


def test_names_limit_the_work_to_the_images_asked_for(features):
    """``extract`` passes the images it was asked for: the others are not even looked at."""
    path, _ = features
    reduce_features_file(path, 8)
    rng = np.random.default_rng(6)
    with h5py.File(path, "a") as f:  # two images added; the next run asks for one of them
        _write_image(f, "new0.jpg", _descriptors(rng, 30), dtype=np.float32)
        _write_image(f, "new1.jpg", _descriptors(rng, 30), dtype=np.float32)
    reduce_features_file(path, 8, names=["new0.jpg", "missing.jpg", "seq/b.jpg"])
    with h5py.File(path, "r") as f:
        assert f["new0.jpg"]["descriptors"].shape == (8, 30)
        assert f["new0.jpg"].attrs["pca_dim"] == 8
        assert f["new1.jpg"]["descriptors"].shape[0] != 8  # not asked for: left as it was
    reduce_features_file(path, 8)  # the `pca` step walks the whole file
    with h5py.File(path, "r") as f:
        assert f["new1.jpg"]["descriptors"].shape == (8, 30)


def test_dim_none_and_errors(features, monkeypatch):
    path, _ = features
    data = path.read_bytes()
    reduce_features_file(path, None)
    assert path.read_bytes() == data
    with pytest.raises(FormatError, match="smaller"):
        reduce_features_file(path, D)
    # A failure while writing leaves the original file untouched and no temporary file.
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pca, "project", broken)
    with pytest.raises(RuntimeError):
        reduce_features_file(path, 8)
    assert path.read_bytes() == data
    assert list(path.parent.iterdir()) == [path]
    monkeypatch.undo()
    reduce_features_file(path, 8, max_samples=100)  # sampled fit
    with pytest.raises(FormatError, match="8 dimensions"):
        reduce_features_file(path, 16)
    with pytest.raises(FormatError, match="does not exist"):
        reduce_features_file(path.with_name("missing.h5"), 8)
