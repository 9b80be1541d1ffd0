"""hloc file layouts: what hloc's own readers expect, written and read back."""

import h5py
import numpy as np
import pytest

from dift_sfm.errors import FormatError
from dift_sfm.formats.features import (
    feature_datasets,
    is_complete_features,
    list_names,
    read_descriptors,
    read_image_size,
    read_keypoints,
)
from dift_sfm.formats.h5store import ShardedH5Writer
from dift_sfm.formats.matches import is_complete_matches, match_datasets, pair_key, read_matches
from dift_sfm.pairs import exhaustive_pairs, read_pairs, sequential_pairs, write_pairs


def _write_features(path, entries):
    w = ShardedH5Writer(path, is_complete_features, {"conf": "test"})
    for name, n, d in entries:
        rng = np.random.default_rng(n)
        w.write(name, feature_datasets(rng.random((n, 2)) * 100, rng.random((n, d)),
                                       rng.random(n), (640, 480)))
    w.finalize()


def test_features_layout_nested_names(tmp_path):
    path = tmp_path / "feats.h5"
    _write_features(path, [("a.jpg", 10, 8), ("sub/dir/b.jpg", 5, 8)])
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"a.jpg", "sub"}
        g = f["sub/dir/b.jpg"]
        assert g["keypoints"].shape == (5, 2) and g["descriptors"].shape == (8, 5)
        assert g["scores"].shape == (5,) and list(g["image_size"][()]) == [640, 480]
        # hloc's matcher turns every dataset of a group into a float tensor: all numeric
        for grp in (f["a.jpg"], g):
            for v in grp.values():
                assert np.issubdtype(v.dtype, np.number)
                np.asarray(v[()], np.float32)
        assert f.attrs["conf"] == "test"
    assert list_names(path) == ["a.jpg", "sub/dir/b.jpg"]
    assert read_keypoints(path, "sub/dir/b.jpg").shape == (5, 2)
    assert read_descriptors(path, "a.jpg").shape == (10, 8)
    assert read_image_size(path, "a.jpg") == (640, 480)
    with pytest.raises(FormatError, match="'c.jpg' is not in features file"):
        read_keypoints(path, "c.jpg")
    with pytest.raises(FormatError, match="does not exist"):
        read_keypoints(tmp_path / "none.h5", "a.jpg")


def test_incomplete_group_is_not_listed(tmp_path):
    path = tmp_path / "feats.h5"
    _write_features(path, [("a.jpg", 10, 8)])
    with h5py.File(path, "a") as f:  # a group another tool left half-written
        f.create_group("b.jpg").create_dataset("keypoints", data=np.zeros((3, 2)))
    assert list_names(path) == ["a.jpg"]
    assert read_keypoints(path, "b.jpg").shape == (3, 2)  # keypoints-only entries can be imported
    with pytest.raises(FormatError, match="'b.jpg' of features file .* has no 'descriptors'"):
        read_descriptors(path, "b.jpg")


def test_matches_int32_both_orientations_and_old_keys(tmp_path):
    path = tmp_path / "matches.h5"
    n0 = 40000  # beyond int16
    m0 = np.full(n0, -1, np.int64)
    m0[35000:35010] = np.arange(33000, 33010)
    w = ShardedH5Writer(path, is_complete_matches)
    w.write(pair_key("sub/a.jpg", "b.jpg"), match_datasets(m0, np.linspace(0, 1, n0)))
    w.finalize()
    with h5py.File(path, "r") as f:
        g = f["sub-a.jpg/b.jpg"]
        assert g["matches0"].dtype == np.int32 and g["matches0"][35000] == 33000
    m, s = read_matches(path, "sub/a.jpg", "b.jpg")
    assert m.shape == (10, 2) and m[0].tolist() == [35000, 33000] and s.shape == (10,)
    mr, _ = read_matches(path, "b.jpg", "sub/a.jpg")
    assert mr[0].tolist() == [33000, 35000]
    # hloc < 1.4 joined the names with '_'
    with h5py.File(tmp_path / "old.h5", "w") as f:
        g = f.create_group("x.jpg_y.jpg")
        g["matches0"] = np.array([1, -1, 0], np.int16)
        g["matching_scores0"] = np.array([0.5, 0, 0.7], np.float16)
    m, s = read_matches(tmp_path / "old.h5", "y.jpg", "x.jpg")
    assert m.tolist() == [[1, 0], [0, 2]] and np.allclose(s, [0.5, 0.7], atol=1e-3)
    with pytest.raises(FormatError, match=r"Pair \(x.jpg, z.jpg\)"):
        read_matches(tmp_path / "old.h5", "x.jpg", "z.jpg")


def test_writer_recovers_from_interrupted_shards(tmp_path):
    path = tmp_path / "feats.h5"
    _write_features(path, [("a.jpg", 4, 8)])
    w = ShardedH5Writer(path, is_complete_features, shard_entries=1000)
    w.write("b.jpg", feature_datasets(np.zeros((3, 2)), np.ones((3, 8)), np.ones(3), (10, 10)))
    w._stop_closer()
    w._shard.flush()
    # simulate kill -9: the shard stays as *.tmp, never renamed, never merged
    w._shard.close()
    w._lock.release()  # what the OS does when the process dies
    (w.parts / "000999-1.tmp").write_bytes(b"\x89HDF garbage from a crash")
    w2 = ShardedH5Writer(path, is_complete_features)
    assert w2.pending_keys() == {"b.jpg"}
    w2.finalize()
    assert list_names(path) == ["a.jpg", "b.jpg"] and not w2.parts.exists()


def test_pairs_read_write_generators(tmp_path):
    names = [f"im{i}.jpg" for i in range(5)]
    assert len(exhaustive_pairs(names)) == 10
    seq = sequential_pairs(names, window=2)
    assert seq == [("im0.jpg", "im1.jpg"), ("im0.jpg", "im2.jpg"), ("im1.jpg", "im2.jpg"),
                   ("im1.jpg", "im3.jpg"), ("im2.jpg", "im3.jpg"), ("im2.jpg", "im4.jpg"),
                   ("im3.jpg", "im4.jpg")]
    wrapped = sequential_pairs(names, window=2, wrap=True)
    assert ("im3.jpg", "im0.jpg") in wrapped and ("im4.jpg", "im1.jpg") in wrapped
    assert len(wrapped) == 10
    write_pairs(tmp_path / "p.txt", seq)
    text = (tmp_path / "p.txt").read_text()
    assert "\n\n" not in text and text.endswith("\n")
    assert read_pairs(tmp_path / "p.txt", names) == seq
    (tmp_path / "bad.txt").write_text("im0.jpg im1.jpg\nim1.jpg\n")
    with pytest.raises(FormatError, match=r"bad.txt:2: expected 'name0 name1'"):
        read_pairs(tmp_path / "bad.txt")
    (tmp_path / "unk.txt").write_text("# c\n\nim0.jpg im1.jpg\nim0.jpg zz.jpg\n")
    with pytest.raises(FormatError, match=r"unk.txt:4: image 'zz.jpg'"):
        read_pairs(tmp_path / "unk.txt", names)
    (tmp_path / "dup.txt").write_text("im0.jpg im1.jpg\nim1.jpg im0.jpg\n")
    assert read_pairs(tmp_path / "dup.txt") == [("im0.jpg", "im1.jpg")]


def test_transposed_copies_as_numpy_does():
    """The blocked copy behind every stored descriptor array: numpy's values, float16 rounding,
    overflow and NaN included, for any number of rows."""
    from dift_sfm.formats.features import transposed

    rng = np.random.default_rng(0)
    for n in (0, 1, 255, 256, 700):
        a = rng.standard_normal((n, 5)).astype(np.float32) * 3e4
        if n:
            a[0, :4] = [np.nan, np.inf, 7e4, 1e-8]
        for dtype in (np.float16, np.float32):
            with np.errstate(over="ignore"):
                want = np.ascontiguousarray(a.T).astype(dtype)
                got = transposed(a, dtype)
            assert got.flags.c_contiguous and got.dtype == dtype and got.shape == (5, n)
            assert np.array_equal(got, want, equal_nan=True)
