"""The planning rules both backends follow (``dift_sfm.planning``): featurizer batches, pair
batches, locality tiles and blocks, the byte-budget cache."""

from collections import Counter

import numpy as np
import pytest

from dift_sfm.errors import ImageReadError
from dift_sfm.pairs import exhaustive_pairs
from dift_sfm.planning import (
    ByteBudgetCache,
    ImageBatcher,
    featurizer_batch_size,
    image_batches,
    locality_order,
    pair_batches,
    pair_tiles,
    plan_blocks,
)


def test_featurizer_batch_size():
    assert featurizer_batch_size({}) == 1
    assert featurizer_batch_size({"batch_size": None}) == 1
    assert featurizer_batch_size({"batch_size": 0}) == 1
    assert featurizer_batch_size({"batch_size": 4}) == 4


@pytest.mark.parametrize("batch_size", [1, 2, 3, 10])
def test_an_unreadable_image_ends_the_batch(batch_size):
    """Units keep the order of the names; a failure closes the batch being built; the push
    (Ray) and pull (local) forms agree."""
    items = [(f"{i}.jpg", ImageReadError(f"bad {i}") if i in (3, 4, 9) else i)
             for i in range(12)]

    def failed(item):
        return isinstance(item, ImageReadError)

    units = list(image_batches(items, batch_size, failed))
    assert [n for u in units for n, _ in u.items] == [n for n, _ in items]
    for unit in units:
        if unit.failed:
            assert len(unit.items) == 1 and failed(unit.items[0][1])
        else:
            assert 1 <= len(unit.items) <= batch_size
            assert not any(failed(item) for _, item in unit.items)
    # a batch is cut short only by a failure or by the end
    for unit, after in zip(units, units[1:] + [None], strict=True):
        if not unit.failed and len(unit.items) < batch_size:
            assert after is None or after.failed
    batcher, pushed = ImageBatcher(batch_size), []
    for name, item in items:
        pushed += batcher.push(name, item, failed(item))
    assert batcher.pending == 2 % batch_size  # 10.jpg and 11.jpg follow the last failure
    pushed += batcher.finish()
    assert pushed == units and batcher.pending == 0 and batcher.finish() == []


def test_pair_batches():
    pairs = [(str(i), str(i + 1)) for i in range(10)]
    assert [len(b) for b in pair_batches(pairs, 4)] == [4, 4, 2]
    assert [p for b in pair_batches(pairs, 3) for p in b] == pairs
    assert [len(b) for b in pair_batches(pairs, 0)] == [1] * 10
    assert list(pair_batches([], 4)) == []


def test_pair_tiles_group_by_image_positions():
    names = [f"im{i}" for i in range(10)]
    pairs = exhaustive_pairs(names)
    tiles = pair_tiles(pairs, 4)
    assert sorted(k for t in tiles for k in t) == list(range(len(pairs)))
    position = {n: i for i, n in enumerate(names)}
    keys = []
    for tile in tiles:
        assert tile == sorted(tile)  # given order inside a tile
        ids = {(min(position[a], position[b]) // 4, max(position[a], position[b]) // 4)
               for a, b in (pairs[k] for k in tile)}
        assert len(ids) == 1
        keys.append(ids.pop())
    assert keys == sorted(keys) and len(set(keys)) == len(keys)  # row-major, each once
    assert pair_tiles([], 3) == []


def test_locality_order_and_blocks_follow_the_same_tiles():
    names = [f"im{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    pairs = [(names[a], names[b]) for a, b in rng.integers(0, 40, (300, 2)) if a != b]
    # locality: the tiles of capacity // 3 images, concatenated
    order = locality_order(pairs, 12)
    assert order == [pairs[k] for t in pair_tiles(pairs, 4) for k in t]
    assert Counter(order) == Counter(pairs)
    # blocks: the tiles of block_images // 2, cut at max_pairs
    blocks = plan_blocks(pairs, block_images=16, max_pairs=10)
    assert [k for _, members in blocks for k in members] == [
        k for t in pair_tiles(pairs, 8) for k in t]


def test_plan_blocks_cover_every_pair_once():
    names = [f"im{i}" for i in range(40)]
    pairs = exhaustive_pairs(names)[:300]
    blocks = plan_blocks(pairs, block_images=16, max_pairs=50)
    covered = sorted(k for _, members in blocks for k in members)
    assert covered == list(range(len(pairs)))
    for images, members in blocks:
        assert len(images) <= 16 and len(members) <= 50
        assert {n for k in members for n in pairs[k]} == set(images)
    # images shared between pairs are shipped once per block: far fewer than 2 per pair
    assert sum(len(i) for i, _ in blocks) < 0.5 * len(pairs)


def test_byte_budget_cache_evicts_least_recently_used_but_never_kept():
    loads = Counter()

    def load(name):
        loads[name] += 1
        return np.zeros(int(name[1:]), np.uint8)  # "aN": N bytes

    cache = ByteBudgetCache(load, budget=10)
    for name in ("a4", "b4", "a4"):
        cache.get(name)
    assert cache.reads == 2 and cache.bytes == 8
    cache.get("c4")  # over budget: b4 (least recently used) goes, a4 stays
    assert list(cache.entries) == ["a4", "c4"] and cache.bytes == 8 and cache.reads == 3
    cache.touch(["a4"])
    keep = {"a4", "c4", "d9"}
    cache.get("d9", keep)  # a batch may exceed the budget: nothing kept is dropped
    assert set(cache.entries) == {"a4", "c4", "d9"} and cache.bytes == 17
    cache.get("e1")  # now the oldest go until within budget
    assert list(cache.entries) == ["d9", "e1"] and cache.bytes == 10
    cache.get("d9")
    assert loads["d9"] == 1 and cache.reads == 5
    cache.clear()
    assert not cache.entries and cache.bytes == 0
