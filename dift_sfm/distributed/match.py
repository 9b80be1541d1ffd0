"""Matching on a Ray cluster: ``RayMatchBackend`` (driver side) and ``MatchWorker``.

The driver cuts the pairs (in their order) into windows and each window into blocks
(``planning.plan_blocks``); descriptors go to the object store once per window and are kept
there between windows (``planning.ByteBudgetCache``); a worker matches a block's pairs in
``planning.pair_batches`` of its matcher's ``pair_batch``, as ``match.LocalBackend`` does.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ..planning import ByteBudgetCache, pair_batches, plan_blocks
from ..runtime import wants_cuda
from .cluster import RayOptions, _cluster_plan, _limit_threads, _Pool, connect

logger = logging.getLogger("dift_sfm")


def _pack(results: list, names: list[str], pairs: list[tuple[int, int]],
          fingerprints: list[str], root_attrs: dict):
    """Task body: a match actor's block packed into a piece (``match.pack_matches``) on a spare
    CPU, so that the GPU worker does not wait for it."""
    from ..match import pack_matches

    return pack_matches([(names[i], names[j]) for i, j in pairs], results,
                        dict(zip(names, fingerprints, strict=True)), root_attrs)


class MatchWorker:
    """Actor body: holds one matcher and matches blocks of pairs."""

    def __init__(self, matcher_conf: dict, cpus: float):
        from ..matchers import get_matcher

        if cpus:
            _limit_threads(cpus)
        self.matcher = get_matcher(matcher_conf)

    def ready(self) -> None:
        return None

    def pid(self) -> int:
        return os.getpid()

    def match(self, pairs: list[tuple[int, int]], pack: tuple | None, root_attrs: dict | None,
              *descriptors: np.ndarray) -> list | Any:
        """Match pairs of indices into ``descriptors``: [(matches0, scores0)] in order, or,
        given ``pack`` = (image names, their feature fingerprints) and the output's
        ``root_attrs``, the block packed into a piece (``match.PackedPairs``: no HDF5 work per
        pair on the driver).

        Each image of the block is prepared (normalised, moved to the device) once, then
        ``pair_batch`` pairs go per batched call (``planning.pair_batches``), as
        ``match.LocalBackend`` does.
        """
        ready = [self.matcher.prepare(d) for d in descriptors]
        out: list = []
        for chunk in pair_batches(pairs, self.matcher.pair_batch):
            out += self.matcher.match_prepared([ready[i] for i, _ in chunk],
                                               [ready[j] for _, j in chunk])
        if pack is None:
            return out
        names, fingerprints = pack
        return _pack(out, names, pairs, fingerprints, root_attrs)


class _Stored(NamedTuple):
    """One image's descriptors in the object store (``nbytes``: what the cache budget counts)."""

    ref: Any
    nbytes: int
    dim: int


class RayMatchBackend:
    """The matching backend of ``match_features`` on a Ray cluster.

    ``__call__(pairs, features, root_attrs=None)`` yields ``(pair, matches0, scores0)`` in
    the order of ``pairs``; given the output's ``root_attrs`` (as ``match_features`` does), each
    block is packed into a piece (by a task on a spare CPU, else by the worker itself) and it
    yields ``match.PackedPairs`` as blocks finish, so the driver does no HDF5 work per pair.
    The driver reads descriptors and puts each image's once per window into the object store;
    a block task receives each of its images once.
    """

    packs_pieces = True  # match_features passes the output's root attributes

    def __init__(self, matcher_conf: dict, options: RayOptions | None = None):
        self.matcher_conf = matcher_conf
        self.options = options or RayOptions()
        self.pool: _Pool | None = None
        self.stats: dict[str, float] = {}

    def __call__(self, pairs: list[tuple[str, str]], features,
                 root_attrs: dict | None = None) -> Iterator[Any]:
        if not pairs:
            return
        from ..match import PackedPairs, check_same_dim

        ray = connect(self.options)
        gpu = wants_cuda(self.matcher_conf.get("device"),
                         ray.cluster_resources().get("GPU", 0) >= 1)
        count, spare = _cluster_plan(ray, gpu, self.options,
                                     f"matcher (device {self.matcher_conf.get('device')})")
        t0 = time.perf_counter()
        self.pool = pool = _Pool(ray, MatchWorker, (self.matcher_conf,), count, gpu,
                                 self.options.cpus_per_worker, "match")
        self.stats = {"workers": count, "startup_s": time.perf_counter() - t0,
                      "bytes_shipped": 0, "bytes_to_workers": 0, "blocks": 0}
        cache = self._descriptor_cache(ray, features)
        max_blocks = self.options.max_in_flight or 2 * count + 2
        step = self.options.window_pairs
        attrs_ref = None if root_attrs is None else ray.put(root_attrs)  # once, not per block
        # packing (HDF5) on a spare CPU when there is one: the matching worker goes on
        pack_task = ray.remote(_pack).options(num_cpus=1, max_retries=3) \
            if root_attrs is not None and spare >= 1 else None
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        pending: deque[tuple[Any, list[int], int]] = deque()  # (ref, pair indices, actor)
        blocks: deque[tuple[list[str], list[int], dict[str, Any]]] = deque()
        next_window = next_yield = handed = 0  # handed: pairs yielded, one by one or packed
        try:
            while handed < len(pairs):
                if not blocks and next_window < len(pairs) \
                        and next_window - handed < 2 * step:
                    part = pairs[next_window:next_window + step]
                    refs = self._put_descriptors(cache, features, part, check_same_dim)
                    for images, members in plan_blocks(part, self.options.block_images):
                        blocks.append((images, [next_window + k for k in members], refs))
                    next_window += len(part)
                while blocks and len(pending) < max_blocks:
                    images, members, refs = blocks.popleft()
                    index = {n: i for i, n in enumerate(images)}
                    local = [(index[pairs[k][0]], index[pairs[k][1]]) for k in members]
                    # what a packed entry records (FeaturesReader remembers each image's)
                    prints = [features.fingerprint(n) for n in images] \
                        if attrs_ref is not None else []
                    in_actor = attrs_ref is not None and pack_task is None
                    i = pool.pick()  # (a reference is resolved only as a top-level argument)
                    ref = pool.actors[i].match.remote(
                        local, (images, prints) if in_actor else None,
                        attrs_ref if in_actor else None, *[refs[n].ref for n in images])
                    if pack_task is not None:
                        ref = pack_task.remote(ref, images, local, prints, attrs_ref)
                    pending.append((ref, members, i))
                    self.stats["blocks"] += 1
                    self.stats["bytes_to_workers"] += sum(refs[n].nbytes for n in images)
                if pending:
                    ready, _ = ray.wait([p[0] for p in pending], num_returns=1,
                                        timeout=0 if next_yield in results else 1.0)
                    for ref in ready:
                        j = next(j for j, p in enumerate(pending) if p[0] == ref)
                        _, members, i = pending[j]
                        del pending[j]
                        pool.done(i)
                        got = ray.get(ref)
                        if isinstance(got, PackedPairs):  # stored as it comes: no order
                            handed += len(members)
                            yield got
                            continue
                        for k, result in zip(members, got, strict=True):
                            results[k] = result
                while next_yield in results:
                    m0, s0 = results.pop(next_yield)
                    yield pairs[next_yield], m0, s0
                    next_yield += 1
                    handed += 1
        finally:
            pool.close()
            cache.clear()

    def _descriptor_cache(self, ray, features) -> ByteBudgetCache[_Stored]:
        """Object-store references of descriptors kept between windows (``descriptor_cache_mb``):
        an image already there is not read or sent again."""

        def put(name: str) -> _Stored:
            desc = features.descriptors(name)
            self.stats["bytes_shipped"] += desc.nbytes
            return _Stored(ray.put(desc), desc.nbytes, desc.shape[1])

        return ByteBudgetCache(put, self.options.descriptor_cache_mb * 2**20)

    @staticmethod
    def _put_descriptors(cache: ByteBudgetCache[_Stored], features, part,
                         check_same_dim) -> dict[str, _Stored]:
        """The stored descriptors of every image of a window (read and put into the object
        store once, or reused from the cache; older entries leave it beyond its budget)."""
        names = list(dict.fromkeys(n for pair in part for n in pair))
        cache.touch(names)
        keep = set(names)
        refs = {name: cache.get(name, keep) for name in names}
        for name0, name1 in part:
            if refs[name0].dim != refs[name1].dim:
                check_same_dim(features, name0, np.empty((0, refs[name0].dim)), name1,
                               np.empty((0, refs[name1].dim)))
        return refs
