"""Appends to an existing output cost what they add, survive kill -9 at any point, and leave
files that hloc's readers (restated here through h5py, as documented) still read."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import h5py
import numpy as np
import pytest
from conftest import CLI_ENV, REPO, texture

from dift_sfm.formats.features import feature_datasets, is_complete_features, list_names
from dift_sfm.formats.h5store import ShardedH5Writer, build_piece
from dift_sfm.formats.journal import journal_path
from dift_sfm.formats.matches import is_complete_matches, match_datasets, pair_key


def _entry(i: int, n: int = 8, d: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return feature_datasets(rng.random((n, 2)) * 100, rng.random((n, d)), rng.random(n),
                            (640, 480))


def _build(path, names, **kw) -> None:
    w = ShardedH5Writer(path, is_complete_features, {"conf": "test"}, shard_entries=10**6,
                        **kw)
    for name in names:
        w.write(name, _entry(int(name[2:8])))
    w.finalize()


def _names(start: int, stop: int) -> list[str]:
    return [f"im{i:06d}.jpg" for i in range(start, stop)]


def _contents(path, only: list[str] | None = None) -> dict[str, bytes]:
    """Every complete entry's datasets, as bytes (what 'identical' compares); ``only``: the
    data of these entries (all names are listed either way)."""
    names = list_names(path)
    if only is not None:
        names = [n for n in names if n in set(only)] + [f"{len(names)} names"]
    with h5py.File(path, "r") as f:
        return {n: b"".join(f[n][k][()].tobytes() for k in sorted(f[n])) if n in f else b""
                for n in names}


@pytest.fixture(scope="module")
def big_output(tmp_path_factory):
    """An output of 3000 entries, built once (copied by the tests that change it)."""
    path = tmp_path_factory.mktemp("big") / "feats.h5"
    _build(path, _names(0, 3000))
    return path


# ------------------------------------------------------------------ cost of an append
def test_append_writes_in_place_what_is_added(tmp_path, big_output):
    path = tmp_path / "feats.h5"
    shutil.copyfile(big_output, path)
    inode, size = os.stat(path).st_ino, path.stat().st_size
    _build(path, _names(3000, 3010))
    entry_bytes = sum(v.nbytes for v in _entry(0).values())
    # the same file (never a copy), grown by the new entries and their metadata only
    assert os.stat(path).st_ino == inode
    assert path.stat().st_size - size < 10 * (entry_bytes + 4096)
    assert list_names(path) == _names(0, 3010)
    assert not journal_path(path).exists() and not path.with_name("feats.h5.parts").exists()
    # replacing an entry in place keeps the others and gives the new data
    w = ShardedH5Writer(path, is_complete_features, {"conf": "test"})
    w.write("im000005.jpg", _entry(99))
    w.finalize()
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["im000005.jpg/keypoints"][()], _entry(99)["keypoints"])
        assert np.array_equal(f["im000006.jpg/keypoints"][()], _entry(6)["keypoints"])
    assert len(list_names(path)) == 3010


def test_replacing_most_entries_rewrites_and_reclaims(tmp_path):
    path = tmp_path / "feats.h5"
    _build(path, _names(0, 40))
    inode, size = os.stat(path).st_ino, path.stat().st_size
    _build(path, _names(0, 30))  # 30 of 40 replaced: a rewrite, no space left unused
    assert os.stat(path).st_ino != inode and path.stat().st_size <= size * 1.1
    assert list_names(path) == _names(0, 40)


def test_pieces_built_elsewhere_are_added(tmp_path):
    path = tmp_path / "feats.h5"
    _build(path, _names(0, 5))
    piece = build_piece([(n, _entry(int(n[2:8])), None) for n in _names(5, 9)],
                        {"conf": "test"})
    w = ShardedH5Writer(path, is_complete_features, {"conf": "test"})
    w.add_piece(piece)
    w.consolidate()  # mid-run: the output already holds them, the writer stays open
    assert list_names(path) == _names(0, 9)
    w.add_piece(build_piece([(n, _entry(int(n[2:8])), None) for n in _names(9, 12)]))
    w.finalize()
    assert _contents(path) == _contents_of_fresh(tmp_path, _names(0, 12))
    with pytest.raises(Exception, match="bytes of an HDF5 file"):
        ShardedH5Writer(path, is_complete_features).add_piece(b"not hdf5")


def _contents_of_fresh(tmp_path, names) -> dict[str, bytes]:
    ref = tmp_path / "ref.h5"
    ref.unlink(missing_ok=True)
    _build(ref, names)
    return _contents(ref)


def test_finished_entry_closed_within_flush_seconds(tmp_path):
    """Durable within about flush_seconds whether or not another entry follows."""
    path = tmp_path / "feats.h5"
    w = ShardedH5Writer(path, is_complete_features, flush_seconds=0.2)
    w.write("a.jpg", _entry(1))
    deadline = time.monotonic() + 30
    while not list(w.parts.glob("*.h5")) and time.monotonic() < deadline:
        time.sleep(0.05)
    shards = list(w.parts.glob("*.h5"))
    assert shards and not list(w.parts.glob("*.tmp"))
    with h5py.File(shards[0], "r") as f:
        assert "a.jpg" in f
    w.finalize()
    assert list_names(path) == ["a.jpg"]


# ------------------------------------------------------------------ hloc's readers
def _hloc_list_h5_names(path) -> list[str]:
    """hloc's documented rule: parents of every dataset ``visititems`` reaches."""
    names = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, obj: names.append(obj.parent.name.strip("/"))
                     if isinstance(obj, h5py.Dataset) else None)
    return sorted(set(names))


def _hloc_get_matches(path, name0, name1) -> np.ndarray:
    """hloc's documented rule: the pair key in either order (new '/' or old '_' joins);
    (M, 2) indices, flipped when the pair is stored reversed."""
    with h5py.File(path, "r") as f:
        for sep in ("/", "_"):
            for a, b, rev in ((name0, name1, False), (name1, name0, True)):
                key = pair_key(a, b, sep)
                if key in f:
                    m = f[key]["matches0"][()]
                    idx = np.where(m != -1)[0]
                    out = np.stack([idx, m[idx]], -1)
                    return out[:, ::-1] if rev else out
    raise ValueError(f"no pair {name0} {name1}")


def test_hloc_reads_appended_outputs(tmp_path, big_output):
    feats, matches = tmp_path / "feats.h5", tmp_path / "matches.h5"
    shutil.copyfile(big_output, feats)
    _build(feats, _names(3000, 3003))
    w = ShardedH5Writer(feats, is_complete_features, {"conf": "test"})
    w.write("queries/q1.jpg", _entry(7))
    w.finalize()
    names = _hloc_list_h5_names(feats)
    assert names == list_names(feats) and "queries/q1.jpg" in names and len(names) == 3004
    with h5py.File(feats, "r") as f:  # hloc's get_keypoints: the dataset as an array
        assert np.array_equal(f["queries/q1.jpg"]["keypoints"].__array__(),
                              _entry(7)["keypoints"])
        assert np.array_equal(f["im002999.jpg"]["keypoints"].__array__(),
                              _entry(2999)["keypoints"])
    # pairs_from_exhaustive(features=...) takes its names from list_h5_names
    assert len([(a, b) for i, a in enumerate(names) for b in names[i + 1:]]) == 3004 * 3003 // 2
    m0 = np.array([2, -1, 0, 1], np.int32)
    for step, (a, b) in enumerate([("im000000.jpg", "im000001.jpg"),
                                   ("queries/q1.jpg", "im000002.jpg")]):
        w = ShardedH5Writer(matches, is_complete_matches)
        w.write(pair_key(a, b), match_datasets(m0, np.ones(4)))
        w.finalize()
        assert step == 0 or not journal_path(matches).exists()
    expected = np.array([[0, 2], [2, 0], [3, 1]])
    assert np.array_equal(_hloc_get_matches(matches, "queries/q1.jpg", "im000002.jpg"), expected)
    assert np.array_equal(_hloc_get_matches(matches, "im000002.jpg", "queries/q1.jpg"),
                          expected[:, ::-1])
    assert np.array_equal(_hloc_get_matches(matches, "im000001.jpg", "im000000.jpg"),
                          expected[:, ::-1])


# ------------------------------------------------------------------ kill -9
_CHILD = r"""
import os, signal, sys, threading, time
import numpy as np
from dift_sfm.formats import journal
from dift_sfm.formats.features import feature_datasets, is_complete_features
from dift_sfm.formats.h5store import ShardedH5Writer
path, start, stop, kill_at, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5])
calls = [0]
def counted(fn):
    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapper
class _Os:  # the journal's view of os: every write, rename, truncate and sync counted
    def __getattr__(self, name):
        fn = getattr(os, name)
        return counted(fn) if name in ("pwrite", "replace", "ftruncate", "fsync", "unlink") else fn
journal.os = _Os()
if delay > 0:
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
w = ShardedH5Writer(path, is_complete_features, {"conf": "test"}, flush_seconds=0.05)
for i in range(start, stop):
    rng = np.random.default_rng(i)
    w.write(f"im{i:06d}.jpg", feature_datasets(rng.random((8, 2)) * 100, rng.random((8, 8)),
                                                rng.random(8), (640, 480)))
w.finalize()
print("calls", calls[0])
"""


def _child(path, start, stop, kill_at=0, delay=0.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, str(path), str(start), str(stop),
                           str(kill_at), str(delay)], env=CLI_ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _check_after_kill(path, old: list[str], new: list[str], reference: dict) -> None:
    """The killed output opens (old or new content), and a rerun ends identical to an
    uninterrupted run."""
    lock = path.with_name(path.name + ".lock")
    if lock.exists():  # a helper still writing the journal's pages holds the lock: wait
        fd = os.open(lock, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.close(fd)
    with h5py.File(path, "r") as f:  # raw h5py, no recovery first (what hloc does)
        assert sorted(f) in (old, old + new)
    assert list_names(path) in (old, old + new)  # dift-sfm readers complete the journal first
    done = _child(path, 0, 0)  # a rerun of nothing new: salvages the shards, finalizes
    assert done.returncode == 0, done.stderr[-2000:]
    rerun = _child(path, len(old), len(old) + len(new))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _contents(path, new + old[::500]) == reference
    assert not journal_path(path).exists()
    assert not path.with_name(path.name + ".parts").exists()


def test_kill_at_each_step_of_an_append_into_a_large_output(tmp_path, big_output):
    old, new = _names(0, 3000), _names(3000, 3012)
    ref = tmp_path / "ref.h5"
    shutil.copyfile(big_output, ref)
    counting = _child(ref, 3000, 3012)  # uninterrupted: how many journaled calls it makes
    assert counting.returncode == 0, counting.stderr[-2000:]
    total = int(counting.stdout.split()[-1])
    reference = _contents(ref, new + old[::500])
    assert list_names(ref) == old + new
    rng = random.Random(0)
    points = sorted({1, 2, total - 1, total, *rng.sample(range(3, total - 1), 6)})
    path = tmp_path / "feats.h5"
    for kill_at in points:
        shutil.copyfile(big_output, path)
        shutil.rmtree(path.with_name("feats.h5.parts"), ignore_errors=True)
        killed = _child(path, 3000, 3012, kill_at=kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-2000:])
        _check_after_kill(path, old, new, reference)


def test_kill_at_random_times_while_appending(tmp_path, big_output):
    old, new = _names(0, 3000), _names(3000, 3400)
    ref = tmp_path / "ref.h5"
    shutil.copyfile(big_output, ref)
    t0 = time.monotonic()
    assert _child(ref, 3000, 3400).returncode == 0
    run_s = time.monotonic() - t0
    reference = _contents(ref, new + old[::500])
    rng = random.Random(1)
    path = tmp_path / "feats.h5"
    for _ in range(4):
        shutil.copyfile(big_output, path)
        shutil.rmtree(path.with_name("feats.h5.parts"), ignore_errors=True)
        killed = _child(path, 3000, 3400, delay=rng.uniform(0.3, 1.0) * run_s)
        if killed.returncode == 0:  # finished before the timer: nothing to check
            continue
        _check_after_kill(path, old, new, reference)


# ------------------------------------------------------------------ CLI, issue 18 item 2
def test_cli_kill_keeps_entries_finished_before_a_big_image(tmp_path):
    """Three small images, then a 12000x9000 one; kill -9 two seconds after the three were
    written: the rerun keeps them (they were durable within about a second)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"a{i}.jpg"), texture(240, 320, seed=i))
    tile = texture(750, 1000, seed=7)
    cv2.imwrite(str(images / "z_big.jpg"), np.tile(tile, (12, 12, 1)),
                [cv2.IMWRITE_JPEG_QUALITY, 80])
    out = tmp_path / "f.h5"
    args = [sys.executable, "-m", "dift_sfm.cli", "extract", str(images), "-o", str(out),
            "--conf", "sift"]
    # every progress update is printed (tqdm otherwise skips "3/4" when the three small
    # images finish within its 0.1 s refresh interval)
    env = {**CLI_ENV, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen = bytearray()
    reader = threading.Thread(target=lambda: [seen.extend(c) for c in iter(
        lambda: proc.stderr.read1(4096), b"")], daemon=True)
    reader.start()
    deadline = time.time() + 300
    while b"3/4" not in seen and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert b"3/4" in seen, seen.decode(errors="replace")[-2000:]
    time.sleep(2.0)
    assert proc.poll() is None, "extract finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # what the rerun resumes from: the three entries, in closed shards
    writer = ShardedH5Writer(out, is_complete_features)
    assert writer.pending_keys() == {"a0.jpg", "a1.jpg", "a2.jpg"}
    writer.close()
    small = tmp_path / "small.txt"
    small.write_text("a0.jpg\na1.jpg\na2.jpg\n")
    rerun = subprocess.run(args + ["--image-list", str(small)], env=CLI_ENV, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "(3 already done)" in rerun.stderr and "Dropping unreadable" not in rerun.stderr
    assert list_names(out) == ["a0.jpg", "a1.jpg", "a2.jpg"]


def test_cli_kill_during_an_append_into_a_large_output(tmp_path):
    """extract into an output of 2000 entries, killed mid-run, rerun: identical to an
    uninterrupted run, and the old entries untouched."""
    from conftest import interrupt_cli

    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):  # enough work that the kill lands mid-run on a quiet machine too
        cv2.imwrite(str(images / f"n{i}.jpg"), texture(300, 400, seed=20 + i))
    first = tmp_path / "first.txt"
    first.write_text("n0.jpg\n")
    out = tmp_path / "f.h5"
    base = [sys.executable, "-m", "dift_sfm.cli", "extract", str(images), "-o", str(out),
            "--conf", "sift"]
    assert subprocess.run(base + ["--image-list", str(first)], env=CLI_ENV, cwd=REPO,
                          capture_output=True, timeout=600).returncode == 0
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
    w = ShardedH5Writer(out, is_complete_features, attrs, shard_entries=10**6)
    for name in _names(0, 2000):  # stand-ins: a large output written with the same conf
        w.write(name, _entry(int(name[2:8]), d=128))
    w.finalize()
    ref = tmp_path / "ref.h5"
    shutil.copyfile(out, ref)
    done = subprocess.run([*base[:-4], "-o", str(ref), "--conf", "sift"], env=CLI_ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = interrupt_cli(base[3:], tmp_path / "f.h5.parts", delay=0.3).wait()
    assert killed == -signal.SIGKILL
    with h5py.File(out, "r") as f:  # what hloc would open right after the kill
        assert len(f) >= 2001
    rerun = subprocess.run(base, env=CLI_ENV, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    new = [f"n{i}.jpg" for i in range(40)]
    assert _contents(out, new + _names(0, 2000)[::400]) == \
        _contents(ref, new + _names(0, 2000)[::400])


def test_packed_pieces_hold_what_the_drivers_writes_would(tmp_path):
    """``extract.pack_described`` / ``match.pack_matches`` (what Ray workers hand over) give
    the entries of the driver's ``write`` of ``feature_entry`` / ``match_entry``."""
    from conftest import assert_same_h5

    from dift_sfm.extract import Described, Storage, feature_entry, pack_described
    from dift_sfm.keypoints import Keypoints
    from dift_sfm.match import match_entry, pack_matches

    rng = np.random.default_rng(0)
    results = [Described(f"d/im{i}.jpg", (640, 480),
                         Keypoints(rng.random((9, 2), np.float32) * 99, rng.random(9, np.float32)),
                         rng.standard_normal((9, 16)).astype(np.float32)) for i in range(3)]
    attrs = {"conf": "test", "conf_json": "{}"}
    for as_half in (False, True):
        one, packed = tmp_path / f"one{as_half}.h5", tmp_path / f"packed{as_half}.h5"
        w = ShardedH5Writer(one, is_complete_features, attrs)
        for r in results:
            w.write(r.name, feature_entry(r, as_half))
        w.finalize()
        piece = pack_described(results, Storage(as_half, attrs))
        assert piece.names == [r.name for r in results] and piece.dim == 16
        w = ShardedH5Writer(packed, is_complete_features, attrs)
        w.add_piece(piece.piece, piece.names)
        w.finalize()
        assert_same_h5(one, packed)
        with h5py.File(packed, "r") as f:
            assert f["d/im0.jpg/descriptors"].dtype == (np.float16 if as_half else np.float32)
            assert f.attrs["conf_json"] == "{}" and f.attrs["featurizer_dim"] == 16

    pairs = [("a.jpg", "b.jpg"), ("a.jpg", "c.jpg")]
    found = [(rng.integers(-1, 9, 9), rng.random(9)) for _ in pairs]
    prints = {"a.jpg": "fa", "b.jpg": "fb", "c.jpg": "fc"}
    w = ShardedH5Writer(tmp_path / "m_one.h5", is_complete_matches, attrs)
    for (n0, n1), (m0, s0) in zip(pairs, found, strict=True):
        w.write(*match_entry((n0, n1), m0, s0, prints[n0], prints[n1]))
    w.finalize()
    piece = pack_matches(pairs, found, prints, attrs)
    w = ShardedH5Writer(tmp_path / "m_packed.h5", is_complete_matches, attrs)
    w.add_piece(piece.piece, [pair_key(*p) for p in piece.pairs])
    w.finalize()
    assert_same_h5(tmp_path / "m_one.h5", tmp_path / "m_packed.h5")
    with h5py.File(tmp_path / "m_packed.h5", "r") as f:
        assert dict(f["a.jpg/c.jpg"].attrs) == {"features0": "fa", "features1": "fc"}


def test_writes_and_pieces_are_merged_in_call_order(tmp_path):
    """A later entry of the same key wins, whether it came by ``write`` or ``add_piece``."""
    path = tmp_path / "feats.h5"
    w = ShardedH5Writer(path, is_complete_features, {"conf": "test"}, shard_entries=100)
    w.write("x.jpg", _entry(1))
    w.add_piece(build_piece([("x.jpg", _entry(2), None)], {"conf": "test"}), ["x.jpg"])
    w.write("x.jpg", _entry(3))  # into a shard opened after the piece
    w.finalize()
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["x.jpg/keypoints"][()], _entry(3)["keypoints"])


def test_pieces_are_merged_as_they_come_unless_the_output_is_replaced(tmp_path):
    """``consolidate_seconds``: a long distributed run adds its pieces to the output as it goes
    (readable at once, in place), but never while it replaces the output (``finalize`` then
    drops what the output held)."""
    path = tmp_path / "feats.h5"
    w = ShardedH5Writer(path, is_complete_features, {"conf": "test"}, consolidate_seconds=0)
    w.add_piece(build_piece([(n, _entry(int(n[2:8])), None) for n in _names(0, 3)],
                            {"conf": "test"}), _names(0, 3))
    assert list_names(path) == _names(0, 3)  # the output exists already, mid-run
    w.add_piece(build_piece([(n, _entry(int(n[2:8])), None) for n in _names(3, 5)],
                            {"conf": "test"}), _names(3, 5))
    assert list_names(path) == _names(0, 5) and not list(w.parts.glob("*.h5"))
    w.finalize()
    assert _contents(path) == _contents_of_fresh(tmp_path, _names(0, 5))

    w = ShardedH5Writer(path, is_complete_features, {"conf": "other"}, consolidate_seconds=0)
    w.discard_pending()  # other settings: this run replaces the output
    w.add_piece(build_piece([(n, _entry(int(n[2:8])), None) for n in _names(7, 9)],
                            {"conf": "other"}), _names(7, 9))
    assert list_names(path) == _names(0, 5)  # untouched until finalize
    w.finalize(drop_existing=True)
    assert list_names(path) == _names(7, 9)
