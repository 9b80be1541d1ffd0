"""Extraction on a Ray cluster: ``RayExtractBackend`` (driver side) and its workers.

Preparation (``extract.prepare``: header, decode, resize, keypoints) runs as Ray tasks on the
cluster's CPUs; description in model-holding actors (``DescribeWorker``). Images are cut into
featurizer batches by ``planning.ImageBatcher``, the rule ``extract.LocalBackend`` follows, so
batched featurizers give identical numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DiftSfmError, ImageReadError
from ..images import read_image_bytes
from ..planning import ImageBatcher, Unit, featurizer_batch_size
from .cluster import RayOptions, _cluster_plan, _limit_threads, _Pool, _unwrap, connect, wants_gpu

logger = logging.getLogger("dift_sfm")


def _prepare(source: bytes | str, path: str, conf: dict, name: str):
    """Decode and prepare one image: (None, PreparedImage) or (error, None).

    ``source`` is the file's bytes or, with a shared filesystem, its path. ImageReadError is a
    per-image outcome; another DiftSfmError stops the run (as it does locally).
    """
    from ..extract import prepare

    try:
        return None, prepare(Path(source) if isinstance(source, str) else source, conf, name,
                             path)
    except DiftSfmError as err:
        return err, None


def _pack(results: list | DiftSfmError, names: list[str], storage):
    """Task body: a describe actor's batch packed into a piece (``extract.pack_described``) on
    a spare CPU, so that the GPU worker does not wait for it. An error passes through."""
    from ..extract import Described, pack_described

    if isinstance(results, DiftSfmError):
        return results
    return pack_described([Described(n, tuple(size), kpts, desc)
                           for n, (size, kpts, desc) in zip(names, results, strict=True)],
                          storage)


class DescribeWorker:
    """Actor body: holds one featurizer (model loaded once) and describes batches."""

    def __init__(self, conf: dict, cpus: float):
        from ..featurizers import get_featurizer

        self.conf = conf
        self.error: DiftSfmError | None = None
        self.featurizer = None
        if cpus:
            _limit_threads(cpus)
        try:
            self.featurizer = get_featurizer(conf["featurizer"])
        except DiftSfmError as err:  # e.g. model not found: reported once, on the driver
            self.error = err

    def ready(self) -> DiftSfmError | None:
        return self.error

    def pid(self) -> int:
        return os.getpid()

    def prepare(self, source: bytes | str, path: str, name: str):
        """``_prepare`` in this actor (when the cluster has no CPU left for tasks)."""
        return _prepare(source, path, self.conf, name)

    def describe(self, names: list[str], storage, *prepared) -> list | Any | DiftSfmError:
        """Describe one batch: [(image_size, keypoints, descriptors)] in the given order, or,
        with a ``storage`` (``extract.Storage``), the batch packed into a piece
        (``extract.Packed``: the driver stores it without any HDF5 work per image)."""
        try:
            descs = self.featurizer.describe_batch([p.resized for p in prepared],
                                                   [p.keypoints_resized for p in prepared])
        except DiftSfmError as err:
            return err
        out = [(p.image_size, p.keypoints, d) for p, d in zip(prepared, descs, strict=True)]
        return out if storage is None else _pack(out, names, storage)


# --------------------------------------------------------------------------- extraction
class RayExtractBackend:
    """The extraction backend of ``extract_features`` on a Ray cluster.

    ``__call__(names, storage=None)`` yields ``(name, Described | ImageReadError)`` in the
    order of ``names``; given a ``storage`` (``extract.Storage``, as ``extract_features`` does),
    each batch is packed into a piece (by a task on a spare CPU, else by the worker itself) and
    it yields ``extract.Packed`` batches in that order instead of described images: the driver
    then does no HDF5 work per image. Connects (or starts a local cluster) and loads the models
    on first use with work to do; the actors are released when the call ends.
    """

    packs_pieces = True  # extract_features passes its Storage

    def __init__(self, conf: dict, image_dir: Path | str, options: RayOptions | None = None):
        self.conf, self.image_dir = conf, Path(image_dir)
        self.options = options or RayOptions()
        self.pool: _Pool | None = None
        self.stats: dict[str, float] = {}
        if conf["keypoints"].get("name") == "import" and not self.options.shared_fs:
            raise DiftSfmError(
                "keypoints.name=import reads a features file on the workers: with --ray it "
                "needs --ray-shared-fs (the file at the same path on every node).")

    def __call__(self, names: list[str], storage=None) -> Iterator[Any]:
        if not names:
            return
        ray = connect(self.options)
        fconf = self.conf["featurizer"]
        gpu = wants_gpu(fconf)
        count, spare = _cluster_plan(ray, gpu, self.options,
                                     f"featurizer '{fconf['name']}' (device "
                                     f"{fconf.get('device', 'auto')})")
        batch_size = featurizer_batch_size(fconf)
        prep_slots = int(spare)
        logger.info("Ray extraction: %d %s worker(s), preparation in %s.", count,
                    "GPU" if gpu else "CPU",
                    f"tasks on {prep_slots} CPUs" if prep_slots else "the workers")
        t0 = time.perf_counter()
        self.pool = _Pool(ray, DescribeWorker, (self.conf,), count, gpu,
                          self.options.cpus_per_worker, "describe")
        self.stats = {"workers": count, "prep_slots": prep_slots,
                      "startup_s": time.perf_counter() - t0}
        window = self.options.max_in_flight or (2 * (prep_slots + count * batch_size) + 2)
        prepare_task = ray.remote(_prepare).options(num_cpus=1, num_returns=2,
                                                    max_retries=3) if prep_slots else None
        storage_ref = None if storage is None else ray.put(storage)  # sent once, not per batch
        # packing (the float16 cast, HDF5) on a spare CPU when there is one: not on the GPU's
        pack_task = ray.remote(_pack).options(num_cpus=1, max_retries=3) \
            if storage is not None and prep_slots else None
        try:
            yield from self._run(ray, names, batch_size, window, prepare_task, storage_ref,
                                 pack_task)
        finally:
            self.pool.close()

    def _submit_prepare(self, name: str, prepare_task) -> tuple[Any, Any, int | None]:
        """Start preparing ``name``: (status ref or ImageReadError, prepared ref, index of the
        actor preparing it or None for a task)."""
        path = self.image_dir / name
        if self.options.shared_fs:
            source: bytes | str = str(path)
        else:
            try:
                source = read_image_bytes(path)
            except ImageReadError as err:
                return err, None, None
        if prepare_task is not None:
            status, prepared = prepare_task.remote(source, str(path), self.conf, name)
            return status, prepared, None
        i = self.pool.pick()
        status, prepared = self.pool.actors[i].prepare.options(num_returns=2).remote(
            source, str(path), name)
        return status, prepared, i

    def _run(self, ray, names: list[str], batch_size: int, window: int,
             prepare_task, storage_ref, pack_task) -> Iterator[Any]:
        from ..extract import Described, Packed

        pool = self.pool
        preparing: deque[tuple[str, Any, Any, int | None]] = deque()  # in order, not batched
        # in order: ("error", name, err) | ("batch", names, ref, actor index)
        outputs: deque[tuple] = deque()
        batcher = ImageBatcher(batch_size)
        submitted = in_flight = 0

        def submit(units: list[Unit]) -> None:
            """Send each complete batch to an actor; queue each failure in its place."""
            for unit in units:
                if unit.failed:
                    outputs.append(("error", *unit.items[0]))
                    continue
                i = pool.pick()
                batch = [n for n, _ in unit.items]
                ref = pool.actors[i].describe.remote(
                    batch, None if pack_task is not None else storage_ref,
                    *[p for _, p in unit.items])
                if pack_task is not None:
                    ref = pack_task.remote(ref, batch, storage_ref)
                outputs.append(("batch", batch, ref, i))

        while submitted < len(names) or preparing or batcher.pending or outputs:
            progressed = False
            while submitted < len(names) and in_flight < window:
                name = names[submitted]
                preparing.append((name, *self._submit_prepare(name, prepare_task)))
                submitted += 1
                in_flight += 1
                progressed = True
            # prepared images, in order, into the batches of planning.ImageBatcher
            while preparing:
                name, status, prepared, actor = preparing[0]
                if not isinstance(status, DiftSfmError):
                    ready, _ = ray.wait([status], timeout=0)
                    if not ready:
                        break
                    status = ray.get(status)
                    if actor is not None:
                        pool.done(actor)
                preparing.popleft()
                progressed = True
                if isinstance(status, DiftSfmError) and not isinstance(status, ImageReadError):
                    raise status
                failed = isinstance(status, ImageReadError)
                submit(batcher.push(name, status if failed else prepared, failed))
            if not preparing and submitted == len(names):
                submit(batcher.finish())
            # yield in order
            while outputs:
                head = outputs[0]
                if head[0] == "error":
                    outputs.popleft()
                    in_flight -= 1
                    progressed = True
                    yield head[1], head[2]
                    continue
                _, batch_names, ref, i = head
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    break
                outputs.popleft()
                pool.done(i)
                progressed = True
                results = _unwrap(ray.get(ref))
                if isinstance(results, Packed):
                    in_flight -= len(batch_names)
                    yield results
                    continue
                for name, (size, kpts, desc) in zip(batch_names, results, strict=True):
                    in_flight -= 1
                    yield name, Described(name, tuple(size), kpts, desc)
            if not progressed:
                waiting = [r for r in ([preparing[0][1]] if preparing else [])
                           if not isinstance(r, DiftSfmError)]
                waiting += [o[2] for o in list(outputs)[:1] if o[0] == "batch"]
                if waiting:
                    ray.wait(waiting, num_returns=1, timeout=1.0)

