"""How work is cut into pieces: the rules that the local and the Ray backends both follow.

- featurizer batches: :func:`featurizer_batch_size` (from the featurizer conf) and
  :class:`ImageBatcher` / :func:`image_batches` (prepared images in order, ``batch_size`` per
  batch; an unreadable image ends the batch being built, its error follows that batch);
- matcher batches: :func:`pair_batches` (``pair_batch`` consecutive pairs per batched call);
- descriptor locality: :func:`pair_tiles` (pairs grouped by tiles of image positions), used
  with the tile size of a streaming cache by :func:`locality_order` (local matching) and with
  the tile size of self-contained blocks by :func:`plan_blocks` (Ray matching);
- :class:`ByteBudgetCache`: the least-recently-used cache of descriptors within a budget of
  bytes (local: descriptors resident for the matcher; Ray: object-store references).

Pure Python and numpy: no torch, no h5py, no Ray. So a backend keeps only what is its own
(threads and queues, or Ray tasks and actors) and two backends cannot drift apart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")
Pair = tuple[str, str]


# --------------------------------------------------------------------------- featurizer batches
def featurizer_batch_size(featurizer_conf: Mapping[str, Any]) -> int:
    """Images per ``describe_batch`` call: the conf's ``batch_size`` (None or 0: 1)."""
    return max(1, int(featurizer_conf.get("batch_size") or 1))


class Unit(NamedTuple):
    """A piece of extraction work: a batch of prepared images to describe together, or one
    image that failed (``failed``; ``items`` then holds its (name, error))."""

    failed: bool
    items: list[tuple[str, Any]]


class ImageBatcher:
    """Cuts a stream of prepared images (in order) into featurizer batches.

    ``push(name, item, failed)`` feeds the next image and returns the units now complete, in
    order: a batch once it holds ``batch_size`` images; a failed image first closes the batch
    being built (so results keep the order of the names), then comes as a unit of its own.
    ``finish()`` closes the last batch. For push-style loops (Ray's); :func:`image_batches`
    is the same rule for an iterable.
    """

    def __init__(self, batch_size: int):
        self.batch_size = max(1, int(batch_size))
        self._open: list[tuple[str, Any]] = []

    @property
    def pending(self) -> int:
        """Images in the batch being built."""
        return len(self._open)

    def push(self, name: str, item: Any, failed: bool = False) -> list[Unit]:
        if failed:
            return self.finish() + [Unit(True, [(name, item)])]
        self._open.append((name, item))
        return self.finish() if len(self._open) >= self.batch_size else []

    def finish(self) -> list[Unit]:
        if not self._open:
            return []
        batch, self._open = self._open, []
        return [Unit(False, batch)]


def image_batches(items: Iterable[tuple[str, T]], batch_size: int,
                  failed: Callable[[T], bool]) -> Iterator[Unit]:
    """The units of :class:`ImageBatcher` for ``items`` ((name, prepared image or error))."""
    batcher = ImageBatcher(batch_size)
    for name, item in items:
        yield from batcher.push(name, item, failed(item))
    yield from batcher.finish()


# --------------------------------------------------------------------------- pair batches
def pair_batches(pairs: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """``pairs`` in consecutive batches of ``batch_size`` (the matcher's ``pair_batch``)."""
    step = max(1, int(batch_size))
    for start in range(0, len(pairs), step):
        yield pairs[start:start + step]


# --------------------------------------------------------------------------- locality
def pair_tiles(pairs: Sequence[Pair], tile: int) -> list[list[int]]:
    """Indices into ``pairs`` grouped by tile, the one rule of descriptor locality.

    Images are numbered by first appearance (first name of a pair before the second); pair
    (a, b) belongs to tile (min(a, b) // T, max(a, b) // T) with T = ``tile``. Tiles come in
    row-major order, the pairs of a tile in their given order. A tile touches at most 2T
    images, and the next tile of its row shares its T row images.
    """
    position: dict[str, int] = {}
    for pair in pairs:
        for name in pair:
            position.setdefault(name, len(position))
    if not pairs:
        return []
    tile = max(1, int(tile))
    tiles = -(-len(position) // tile)
    index = np.array([[position[a], position[b]] for a, b in pairs], np.int64).reshape(-1, 2)
    index //= tile
    key = index.min(1) * tiles + index.max(1)
    order = np.argsort(key, kind="stable")
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    return [part.tolist() for part in np.split(order, cuts)]


def stream_tile(capacity: int) -> int:
    """Tile size for pairs matched in sequence through an LRU cache of ``capacity`` images:
    a tile (2T images) plus the next tile's new column (T) stay resident, so T = capacity // 3."""
    return max(1, capacity // 3)


def block_tile(block_images: int) -> int:
    """Tile size for self-contained blocks of at most ``block_images`` images (a block is
    shipped whole to a worker, nothing carries over): a tile's 2T images, T = block_images // 2."""
    return max(1, block_images // 2)


def locality_order(pairs: Sequence[Pair], capacity: int) -> list[Pair]:
    """``pairs`` in an order that needs few descriptor reads with ``capacity`` images resident.

    The tiles of :func:`pair_tiles` with T = :func:`stream_tile` (capacity // 3), one after
    another: a least-recently-used cache of 3T images reads each column block once per row
    block, about N^2 / (2T) + N reads for the exhaustive pairs of N images instead of about one
    per pair. When every image fits (capacity >= N), the order is unchanged.
    """
    images = len(dict.fromkeys(n for pair in pairs for n in pair))
    if capacity >= images:
        return list(pairs)
    return [pairs[k] for part in pair_tiles(pairs, stream_tile(capacity)) for k in part]


def plan_blocks(pairs: Sequence[Pair], block_images: int,
                max_pairs: int = 1024) -> list[tuple[list[str], list[int]]]:
    """Group pairs into blocks of at most ``block_images`` images (and ``max_pairs`` pairs).

    The tiles of :func:`pair_tiles` with T = :func:`block_tile` (block_images // 2), each cut
    into parts of at most ``max_pairs`` pairs: pairs sharing images land in the same block
    (an exhaustive window of r rows gives blocks of about r x T pairs for r + T images).
    Returns ``[(image names of the block, indices into pairs)]``.
    """
    blocks: list[tuple[list[str], list[int]]] = []
    for members in pair_tiles(pairs, block_tile(block_images)):
        for start in range(0, len(members), max_pairs):
            part = members[start:start + max_pairs]
            images = list(dict.fromkeys(n for k in part for n in pairs[k]))
            blocks.append((images, part))
    return blocks


# --------------------------------------------------------------------------- cache
class ByteBudgetCache(Generic[T]):
    """Values of the images used last, within a budget of bytes (least recently used first out).

    ``get(name, keep)`` returns an image's value (anything with ``nbytes``), loading it
    (``load``) on a miss; then the least recently used entries are dropped until the cache fits
    the budget, except ``name`` and those in ``keep`` (the images of the batch or window being
    built, touched just before: the cache may exceed the budget by one batch). ``reads``
    counts the loads.
    """

    def __init__(self, load: Callable[[str], T], budget: int | float):
        self.load = load
        self.budget = budget
        self.entries: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self.bytes = 0
        self.reads = 0

    def touch(self, names: Iterable[str]) -> None:
        """Mark ``names`` (those cached) as used now."""
        for name in names:
            if name in self.entries:
                self.entries.move_to_end(name)

    def get(self, name: str, keep: Container[str] = ()) -> T:
        entry = self.entries.get(name)
        if entry is None:
            value = self.load(name)
            self.reads += 1
            entry = self.entries[name] = (value, int(value.nbytes))  # type: ignore[attr-defined]
            self.bytes += entry[1]
            self._evict(name, keep)
        self.entries.move_to_end(name)
        return entry[0]

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def _evict(self, name: str, keep: Container[str]) -> None:
        """Drop the oldest entries until within budget; never ``name`` (the newest) or
        ``keep`` (touched just before: everything older is gone once one is reached)."""
        while self.bytes > self.budget:
            oldest = next(iter(self.entries))
            if oldest == name or oldest in keep:
                break
            self.bytes -= self.entries.pop(oldest)[1]
