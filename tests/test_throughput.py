"""Pipelined extraction and batched matching give exactly the results of the plain loops."""

import subprocess
import sys
import time

import cv2
import h5py
import numpy as np
import pytest
import torch
from conftest import CLI_ENV, assert_same_h5, interrupt_cli, texture, texture_folder

from dift_sfm.confs import get_conf
from dift_sfm.errors import DiftSfmError, ImageReadError, PartialFailure
from dift_sfm.extract import LocalBackend, default_workers, extract_features
from dift_sfm.match import LocalBackend as MatchBackend
from dift_sfm.match import match_features
from dift_sfm.matchers import get_matcher, mutual_nearest_neighbours
from dift_sfm.matchers.mnn import mnn_batch, prepare_descriptors
from dift_sfm.pairs import exhaustive_pairs, write_pairs
from dift_sfm.streams import run_ahead


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        cv2.imwrite(str(images / f"{i}.png"), texture(200 + 8 * i, 260, seed=i))
    (images / "3.png").write_bytes(b"not an image")  # a bad image in the middle
    return images


@pytest.mark.parametrize("batch_size", [1, 3])
def test_workers_give_identical_outcomes_and_files(folder, tmp_path, batch_size):
    conf = get_conf("sift", {"keypoints.max_keypoints": 256,
                             "featurizer.batch_size": batch_size})
    names = [f"{i}.png" for i in range(7)]
    serial = list(LocalBackend(conf, folder, num_workers=0)(names))
    piped = list(LocalBackend(conf, folder, num_workers=3, prefetch=2)(names))
    assert [n for n, _ in piped] == names == [n for n, _ in serial]
    assert isinstance(piped[3][1], ImageReadError)
    for (_, a), (_, b) in zip(serial, piped, strict=True):
        if isinstance(a, ImageReadError):
            assert str(a) == str(b)
        else:
            assert np.array_equal(a.descriptors, b.descriptors)
            assert np.array_equal(a.keypoints.xy, b.keypoints.xy)
    outs = []
    for workers in (0, 2):
        out = tmp_path / f"f{workers}.h5"
        backend = LocalBackend(conf, folder, num_workers=workers)
        with pytest.raises(PartialFailure):
            extract_features(conf, folder, out, backend=backend)
        outs.append(out)
    assert_same_h5(*outs)


def test_pool_size_and_bad_worker_type(folder):
    conf = get_conf("sift")
    assert LocalBackend(conf, folder).num_workers == default_workers()  # None: the default
    assert LocalBackend(conf, folder, num_workers=0).num_workers == 0  # no pool
    assert LocalBackend(conf, folder, num_workers=-3).num_workers == 0
    assert LocalBackend(conf, folder, num_workers=3).num_workers == 3
    with pytest.raises(DiftSfmError, match="Unknown worker type 'fibre'"):
        LocalBackend(conf, folder, worker_type="fibre")


def test_run_ahead_keeps_order_raises_and_stops():
    assert list(run_ahead(iter(range(50)), 3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("boom")

    it = run_ahead(failing(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = run_ahead(endless(), 2)
    assert next(it) == 0
    it.close()  # the producer stops within a few items
    time.sleep(0.3)
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n < 10


def test_kill_9_during_pipelined_run_then_resume_is_identical(tmp_path):
    assert default_workers() > 0  # the CLI below runs the pipelined backend
    images = texture_folder(tmp_path / "images", 40, 240, 320)

    def cmd(out):
        return ["extract", str(images), "-o", str(out), "--set", "keypoints.max_keypoints=512"]

    def run(out):
        return subprocess.run([sys.executable, "-m", "dift_sfm.cli", *cmd(out)], env=CLI_ENV,
                              capture_output=True, text=True)

    out = tmp_path / "f.h5"
    interrupt_cli(cmd(out), tmp_path / "f.h5.parts").wait()
    result = run(out)
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stderr
    ref = tmp_path / "ref.h5"
    result = run(ref)
    assert result.returncode == 0, result.stderr
    assert_same_h5(out, ref)


def _pairs(rng):
    def pair(n0, n1, d=24):
        base = rng.standard_normal((max(n0, n1, 1), d)).astype(np.float32) * 2
        a = base[rng.permutation(len(base))[:n0]] + 0.4 * rng.standard_normal((n0, d))
        return a.astype(np.float32), base[:n1].copy()

    out = [pair(*n) for n in [(300, 500), (500, 300), (0, 20), (20, 0), (1, 1), (2, 3),
                              (130, 130), (123, 77), (64, 64)]]
    dup = out[-1][1].copy()
    dup[5] = dup[4]  # exact ties: duplicated descriptors
    out.append((dup.copy(), dup))
    return out


@pytest.mark.parametrize("metric,ratio,min_score", [
    ("cosine", None, None), ("cosine", 0.8, None), ("cosine", 0.9, 0.5),
    ("l2", None, None), ("l2", 0.8, None), ("l2", None, 3.0)])
@pytest.mark.parametrize("chunk", [None, 16])
def test_batched_matching_equals_per_pair(metric, ratio, min_score, chunk):
    pairs = _pairs(np.random.default_rng(0))
    ref = [mutual_nearest_neighbours(a, b, metric, ratio, min_score, chunk=chunk)
           for a, b in pairs]
    got = mnn_batch([prepare_descriptors(a, metric) for a, _ in pairs],
                    [prepare_descriptors(b, metric) for _, b in pairs],
                    metric, ratio, min_score, chunk=chunk)
    for (m_ref, s_ref), (m, s) in zip(ref, got, strict=True):
        assert m.dtype == np.int64 and s.dtype == np.float32
        assert np.array_equal(m, m_ref) and np.array_equal(s, s_ref)
    # one-to-one, and the exact ties resolved to the lowest index
    for m, _ in got:
        kept = m[m > -1]
        assert len(np.unique(kept)) == len(kept)
    assert (got[2][0] == -1).all() and got[3][0].shape == (20,) and (got[3][0] == -1).all()


def test_batched_matching_agrees_with_dense_reference():
    from kornia.feature import match_mnn

    rng = np.random.default_rng(3)
    a, b = _pairs(rng)[0]
    t0, t1 = (torch.nn.functional.normalize(torch.as_tensor(x), dim=1) for x in (a, b))
    _, idx = match_mnn(t0, t1)
    ref = np.full(len(a), -1, np.int64)
    ref[idx[:, 0].numpy()] = idx[:, 1].numpy()
    got = mnn_batch([t0, t0[:100]], [t1, t1[:50]])
    assert np.array_equal(got[0][0], ref)


def test_half_precision_path_agrees(monkeypatch):
    """fp16 products (emulated on CPU: fp16-rounded inputs) keep nearly every match."""
    rng = np.random.default_rng(4)
    a, b = _pairs(rng)[0]
    ref = mutual_nearest_neighbours(a, b, ratio_threshold=0.9)
    d0, d1 = prepare_descriptors(a, "cosine"), prepare_descriptors(b, "cosine")
    got = mnn_batch([d0], [d1], ratio_threshold=0.9, half=True)[0]
    assert (got[0] == ref[0]).mean() > 0.99
    both = (got[0] > -1) & (ref[0] > -1)
    assert np.abs(got[1][both] - ref[1][both]).max() < 1e-5


def test_match_features_batched_equals_one_pair_at_a_time(tmp_path):
    rng = np.random.default_rng(5)
    from dift_sfm.formats.features import feature_datasets, is_complete_features
    from dift_sfm.formats.h5store import ShardedH5Writer

    feats = tmp_path / "f.h5"
    writer = ShardedH5Writer(feats, is_complete_features)
    names = [f"{i}.jpg" for i in range(6)]
    base = rng.standard_normal((400, 32)).astype(np.float32)
    for i, name in enumerate(names):
        n = 150 + 40 * i
        d = base[rng.permutation(400)[:n]] + 0.3 * rng.standard_normal((n, 32))
        writer.write(name, feature_datasets(rng.random((n, 2)).astype(np.float32) * 100,
                                            d.astype(np.float32), np.ones(n, np.float32),
                                            (100, 100), False))
    writer.finalize()
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, exhaustive_pairs(names))
    outs = []
    for batch in (1, 4):
        conf = get_conf("sift", {"matcher.pair_batch": batch, "matcher.prefetch": 3})
        out = tmp_path / f"m{batch}.h5"
        # a 1-byte budget: only the batch being built stays resident (evictions, reordering)
        match_features(conf, pairs, feats, out, backend=MatchBackend(conf["matcher"],
                                                                     cache_bytes=1))
        outs.append(out)
    assert_same_h5(*outs)
    matcher = get_matcher(get_conf("sift")["matcher"])
    assert matcher.pair_batch >= 1


def test_kill_9_during_match_then_resume_is_identical(tmp_path):
    """`dift-sfm match` killed mid-run (entries flushed, shard still open): the rerun
    salvages the flushed entries and ends with the file of an uninterrupted run."""
    import re

    from dift_sfm.formats.features import feature_datasets, is_complete_features
    from dift_sfm.formats.h5store import ShardedH5Writer

    rng = np.random.default_rng(7)
    feats = tmp_path / "f.h5"
    writer = ShardedH5Writer(feats, is_complete_features, root_attrs={"conf": "sift"})
    names = [f"{i:02d}.jpg" for i in range(16)]
    for name in names:
        n = 2048
        d = rng.standard_normal((n, 128)).astype(np.float32)
        writer.write(name, feature_datasets(rng.random((n, 2)).astype(np.float32) * 100, d,
                                            np.ones(n, np.float32), (100, 100), False))
    writer.finalize()
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, exhaustive_pairs(names))  # 120 pairs, several seconds on a CPU

    def cmd(out):
        return ["match", str(pairs), "--features", str(feats), "--output", str(out), "--conf",
                "sift"]

    def run(out):
        return subprocess.run([sys.executable, "-m", "dift_sfm.cli", *cmd(out)], env=CLI_ENV,
                              capture_output=True, text=True)

    out = tmp_path / "m.h5"
    parts = tmp_path / "m.h5.parts"
    # past the writer's flush interval (1 s): some entries are on disk
    interrupt_cli(cmd(out), parts, "*.tmp", delay=1.5).wait()
    assert not out.exists() and list(parts.glob("*.tmp"))
    result = run(out)
    assert result.returncode == 0, result.stderr
    done = re.search(r"\((\d+) already done\)", result.stderr)
    assert done and 0 < int(done.group(1)) < 120, result.stderr
    ref = tmp_path / "ref.h5"
    result = run(ref)
    assert result.returncode == 0, result.stderr
    assert_same_h5(out, ref)
    with h5py.File(out) as a, h5py.File(ref) as b:
        assert dict(a.attrs) == dict(b.attrs)
        for key in ("00.jpg/01.jpg", "05.jpg/12.jpg"):
            assert dict(a[key].attrs) == dict(b[key].attrs)
