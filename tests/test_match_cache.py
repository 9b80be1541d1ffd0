"""Matching keeps descriptors resident within a memory budget (``matcher.cache_mb``) and
processes the pairs in an order that needs few reads; the matches do not change."""

import json
import logging
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch
from conftest import h5_datasets

from dift_sfm import runtime
from dift_sfm.confs import get_conf
from dift_sfm.formats.features import FeaturesReader, feature_datasets, is_complete_features
from dift_sfm.formats.h5store import ShardedH5Writer
from dift_sfm.formats.matches import MatchesReader
from dift_sfm.formats.resume import may_resume, settings_diff
from dift_sfm.match import LocalBackend, match_features
from dift_sfm.matchers import MNN
from dift_sfm.pairs import exhaustive_pairs, write_pairs
from dift_sfm.planning import locality_order
from dift_sfm.runtime import cache_budget

DIM = 8


def write_features(path, sizes: list[int], seed: int = 0) -> list[str]:
    """A features file with one image per size (keypoints), descriptors near a shared base so
    that pairs have matches; written with the package's writer."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((64, DIM)).astype(np.float32)
    writer = ShardedH5Writer(path, is_complete_features, root_attrs={"conf": "sift"})
    names = [f"{i:03d}.jpg" for i in range(len(sizes))]
    for name, n in zip(names, sizes, strict=True):
        d = base[rng.integers(0, len(base), n)] + 0.3 * rng.standard_normal((n, DIM))
        writer.write(name, feature_datasets(rng.random((n, 2)).astype(np.float32) * 100,
                                            d.astype(np.float32), np.ones(n, np.float32),
                                            (100, 100), False))
    writer.finalize()
    return names


def lru_reads(order: list[tuple[str, str]], capacity: int) -> int:
    """Descriptor reads of the former backend: an LRU of ``capacity`` images, pairs in order."""
    cache: OrderedDict[str, None] = OrderedDict()
    reads = 0
    for pair in order:
        for name in pair:
            if name not in cache:
                reads += 1
                cache[name] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
            cache.move_to_end(name)
    return reads


@pytest.fixture
def count_reads(monkeypatch) -> Counter:
    """Counts ``FeaturesReader.descriptors`` calls per image name."""
    calls: Counter = Counter()
    original = FeaturesReader.descriptors

    def descriptors(self, name):
        calls[name] += 1
        return original(self, name)

    monkeypatch.setattr(FeaturesReader, "descriptors", descriptors)
    return calls


# ----------------------------------------------------------------------- locality order
def test_locality_order_is_a_permutation_and_unchanged_when_everything_fits():
    names = [f"{i}.jpg" for i in range(30)]
    pairs = exhaustive_pairs(names)
    rng = np.random.default_rng(0)
    random_pairs = [(names[a], names[b]) for a, b in rng.integers(0, 30, (200, 2)) if a != b]
    for p in (pairs, random_pairs, list(reversed(pairs))):
        for capacity in (1, 2, 5, 12, 29):
            order = locality_order(p, capacity)
            assert Counter(order) == Counter(p)
        assert locality_order(p, 30) == p and locality_order(p, 10**6) == p
    assert locality_order([], 4) == []
    # sequential pairs (window 3) with room for 12 images: tiles of 4 keep the reads at one
    # per image, as the given order did
    seq = [(names[i], names[j]) for i in range(30) for j in range(i + 1, min(30, i + 4))]
    assert lru_reads(locality_order(seq, 12), 12) == lru_reads(seq, 12) == 30


def test_exhaustive_60_images_read_far_fewer_times(tmp_path, count_reads):
    """60 images, room for 12: the tiled order reads each column block once per row block."""
    n_images, capacity = 60, 12
    feats, pairs_file = tmp_path / "f.h5", tmp_path / "pairs.txt"
    names = write_features(feats, [32] * n_images)
    pairs = exhaustive_pairs(names)
    write_pairs(pairs_file, pairs)
    per_image = 32 * DIM * 4  # prepared: float32 (N, D) on the device
    conf = get_conf("sift", {"matcher.device": "cpu", "matcher.pair_batch": 1})
    backend = LocalBackend(conf["matcher"], cache_bytes=capacity * per_image)
    match_features(conf, pairs_file, feats, tmp_path / "m.h5", backend=backend)

    reads = sum(count_reads.values())
    tile = capacity // 3
    blocks = -(-n_images // tile)
    # per row block: its diagonal tile and every tile to its right load <= T new images each
    bound = tile * blocks * (blocks + 1) // 2  # 480, about N^2 / (2T) + N / 2
    old = lru_reads(pairs, capacity)  # the former LRU of `capacity` images, pairs in order
    message = (f"{len(pairs)} pairs: former LRU-{capacity} in pair order {old} reads, "
               f"budgeted cache + locality order {reads} reads (bound {bound})")
    logging.getLogger("dift_sfm").info(message)
    assert backend.stats["reads"] == reads and backend.stats["capacity"] == capacity, message
    assert backend.stats["reordered"] == 1, message
    assert reads <= bound < n_images ** 2 / tile + n_images, message
    assert reads * 3 < old and reads * 3 < len(pairs), message
    assert set(count_reads) == set(names), message
    with MatchesReader(tmp_path / "m.h5") as f:
        assert all(f.has(*p) for p in pairs)


def test_everything_fits_reads_each_image_once_in_pair_order(tmp_path, count_reads):
    feats, pairs_file = tmp_path / "f.h5", tmp_path / "pairs.txt"
    names = write_features(feats, [20 + i for i in range(10)])
    pairs = exhaustive_pairs(names)
    write_pairs(pairs_file, pairs)
    conf = get_conf("sift", {"matcher.device": "cpu", "matcher.cache_mb": 64})
    backend = LocalBackend(conf["matcher"])
    assert backend.budget() == 64 * 2**20
    with FeaturesReader(feats) as f:
        got = [pair for pair, _, _ in backend(pairs, f)]
    assert got == pairs and backend.stats["reordered"] == 0
    assert count_reads == Counter({name: 1 for name in names})


# ----------------------------------------------------------------------- same matches
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_budget_gives_the_same_matches(tmp_path, batch):
    feats, pairs_file = tmp_path / "f.h5", tmp_path / "pairs.txt"
    sizes = [40 + 7 * (i % 5) for i in range(14)]
    sizes[5] = 0  # an image without keypoints
    names = write_features(feats, sizes, seed=1)
    pairs = exhaustive_pairs(names)
    rng = np.random.default_rng(2)
    pairs = [pairs[k] if k % 3 else pairs[k][::-1] for k in rng.permutation(len(pairs))]
    write_pairs(pairs_file, pairs)
    over = {"matcher.device": "cpu", "matcher.pair_batch": batch, "matcher.prefetch": 4,
            "matcher.ratio_threshold": 0.95}
    unlimited = get_conf("sift", over)
    ref = tmp_path / "ref.h5"
    big = LocalBackend(unlimited["matcher"], cache_bytes=2**40)
    match_features(unlimited, pairs_file, feats, ref, backend=big)
    assert big.stats["reordered"] == 0

    tiny = get_conf("sift", {**over, "matcher.cache_mb": 0})  # floored to one batch
    backend = LocalBackend(tiny["matcher"])
    with FeaturesReader(feats) as f:
        yielded = [pair for pair, _, _ in backend(pairs, f)]
    first = next(n for pair in pairs for n in pair if sizes[names.index(n)])
    per_image = sizes[names.index(first)] * DIM * 4  # the first image read with descriptors
    assert backend.stats["budget_bytes"] == 2 * batch * per_image
    assert backend.stats["reordered"] == 1 and yielded != pairs
    assert Counter(yielded) == Counter(pairs)
    out = tmp_path / "tiny.h5"
    match_features(tiny, pairs_file, feats, out, backend=LocalBackend(tiny["matcher"]))

    a, b = h5_datasets(ref), h5_datasets(out)
    assert a.keys() == b.keys() and len(a) == 2 * len(pairs)  # matches0 + scores per pair
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    with MatchesReader(ref) as f:
        assert sum(len(f.matches(*p)[0]) for p in pairs) > len(pairs)  # matches to compare


# ----------------------------------------------------------------------- the conf key
def test_cache_mb_validates():  # the conf's checks of cache_mb: tests/test_confs.py
    with pytest.raises(ValueError, match="cache_mb"):
        MNN({"cache_mb": -1})
    assert MNN({"cache_mb": 3, "device": "cpu"}).cache_bytes() == 3 * 2**20


def test_cache_mb_auto(monkeypatch):
    assert cache_budget(0, "cpu") == 0 and cache_budget(10, "cpu") == 10 * 2**20
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(runtime.os, "sysconf", lambda key: pages[key])
    assert cache_budget("auto", "cpu") == int(0.25 * 1000 * 4096)

    def unknown(key):
        raise ValueError(key)

    monkeypatch.setattr(runtime.os, "sysconf", unknown)
    assert cache_budget("auto", "cpu") == 2 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    assert cache_budget("auto", torch.device("cuda")) == int(0.4 * 10 * 2**30)
    assert cache_budget(None, "cuda") == int(0.4 * 10 * 2**30)


def test_changing_cache_mb_resumes(tmp_path):
    feats, pairs_file, out = tmp_path / "f.h5", tmp_path / "pairs.txt", tmp_path / "m.h5"
    names = write_features(feats, [30] * 5)
    write_pairs(pairs_file, exhaustive_pairs(names))
    first = get_conf("sift", {"matcher.device": "cpu", "matcher.cache_mb": 0})
    match_features(first, pairs_file, feats, out)
    before = h5_datasets(out)
    given: list = []

    def backend(pairs, features):
        given.extend(pairs)
        return iter(())

    for value in ("auto", 4096):
        conf = get_conf("sift", {"matcher.device": "cpu", "matcher.cache_mb": value})
        with MatchesReader(out) as f:
            stored = json.loads(f.attrs["matcher_json"])
        assert stored["cache_mb"] != value and settings_diff(stored, conf["matcher"]) == []
        assert may_resume(out, stored, conf["matcher"], overwrite=False, what="matches file")
        match_features(conf, pairs_file, feats, out, backend=backend)
    assert given == []  # every pair already done: nothing recomputed
    after = h5_datasets(out)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
