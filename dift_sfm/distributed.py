"""Extraction and matching on a Ray cluster (``dift-sfm extract|match|reconstruct --ray``).

The Ray backends plug into the seams of ``dift_sfm.extract.extract_features`` and
``dift_sfm.match.match_features``: the driver (this process) still lists the images, decides
what is left to do, and writes every output through the crash-safe sharded writer; the backends
only compute, on the cluster, and hand results back in the order they were asked for. So the
output files are the ones a single-process run writes, and either kind of run resumes the other.

Extraction: the driver reads each image file and puts its bytes into Ray's object store (no
shared filesystem needed; ``shared_fs`` lets workers read the path themselves). Preparation
(decode, ``resize_max``, keypoints) runs as Ray tasks on the cluster's CPUs; description runs
in model-holding actors, one per GPU (or ``workers`` CPU actors), each loading its model once.
Images are grouped into featurizer batches exactly as ``extract.LocalBackend`` groups them, so
batched featurizers give identical numbers. At most ``max_in_flight`` images are between
"submitted" and "yielded" at any time, so memory does not grow with the number of images.

Matching: the driver cuts the pairs (in their order) into windows, and each window into blocks
of at most ``block_images`` images; each image's descriptors go to the object store once per
window and to a worker once per block, never once per pair.

Faults: actors restart when their process dies (``max_restarts``) and Ray re-runs their
in-flight calls (``max_task_retries``); prepare tasks are retried by Ray. A dead driver leaves
the usual shards: the next run, with or without ``--ray``, resumes from them.

Ray is imported only when a backend first runs (``pip install "dift-sfm[ray]"``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiftSfmError, ImageReadError
from .images import decode_image, read_image_bytes

logger = logging.getLogger("dift_sfm")

#: Featurizers that run a diffusion network: they want a GPU unless told ``device=cpu``.
GPU_FEATURIZERS = ("sd", "adm")
#: Ray namespace of the actors (their names carry a per-run id).
NAMESPACE = "dift_sfm"


class RayUnavailableError(DiftSfmError):
    """Ray is not installed."""


class RayClusterError(DiftSfmError):
    """The Ray cluster cannot be reached or cannot run the request (e.g. no GPU)."""


@dataclass
class RayOptions:
    """How to reach the cluster and how much of it to use.

    Attributes:
        address: cluster address (``ray://host:10001`` or ``host:6379``); default
            ``RAY_ADDRESS``, else a local cluster is started with every GPU of this machine.
        workers: number of model-holding actors (default: one per GPU for a GPU conf; for a
            CPU conf half the cluster's CPUs, at least 1). Matching uses as many actors.
        shared_fs: workers read images from the driver's path (a shared filesystem) instead
            of receiving their bytes.
        max_in_flight: images (extract) or blocks (match) submitted but not yet yielded;
            default: enough to keep every actor busy.
        block_images: most images per matching block.
        window_pairs: pairs per matching window (results are reordered within a window).
        descriptor_cache_mb: descriptors kept in the object store between windows (MiB); an
            image already there is not read or sent again (exhaustive pairs revisit every
            image in every window).
        cpus_per_worker: CPUs each CPU actor reserves (and its torch threads).
    """

    address: str | None = None
    workers: int | None = None
    shared_fs: bool = False
    max_in_flight: int | None = None
    block_images: int = 64
    window_pairs: int = 2048
    descriptor_cache_mb: float = 2048
    cpus_per_worker: float = 1.0
    init_kwargs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- Ray access
def import_ray():
    """The ``ray`` module, or RayUnavailableError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise RayUnavailableError(
            'Ray is not installed; --ray needs it: pip install "dift-sfm[ray]" (or '
            'pip install "ray>=2.9").') from err
    return ray


def connect(options: RayOptions):
    """Connect to the cluster of ``options.address`` / ``RAY_ADDRESS``, or start a local one.

    Reuses a connection this process already holds. Returns the ``ray`` module.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.WARNING, "namespace": NAMESPACE,
                              **options.init_kwargs}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RayClusterError(
                f"Could not connect to the Ray cluster at '{address}' ({first}). Check the "
                "address (`ray status` on the head node prints it) or leave out --ray-address "
                "and RAY_ADDRESS to start a local cluster.") from err
        logger.info("Connected to the Ray cluster at %s: %s.", address,
                    _describe_resources(ray.cluster_resources()))
    else:
        cpus = os.cpu_count() or 1
        if options.workers:  # N CPU actors must fit, preparation then runs in them
            cpus = max(cpus, int(math.ceil(options.workers * options.cpus_per_worker)))
        kwargs.setdefault("num_cpus", cpus)
        ray.init(**kwargs)
        logger.info("Started a local Ray cluster: %s.",
                    _describe_resources(ray.cluster_resources()))
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (RayClusterError) when nothing listens at ``host:port``: Ray itself retries
    for minutes. ``auto``/``local`` and addresses without a port are left to Ray."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise RayClusterError(
            f"Could not reach the Ray cluster at '{address}' ({err.strerror or err}). Check "
            "the address (`ray status` on the head node prints it) and that the head node is "
            "running, or leave out --ray-address and RAY_ADDRESS to start a local "
            "cluster.") from err


def _describe_resources(resources: dict) -> str:
    return (f"{int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs, "
            f"{sum(1 for k in resources if k.startswith('node:') and 'internal' not in k)} "
            "node(s)")


def wants_gpu(featurizer_conf: dict) -> bool:
    """True if a featurizer conf needs a GPU worker: a diffusion featurizer whose device is
    ``auto`` (CUDA when present) or names CUDA."""
    device = str(featurizer_conf.get("device") or "auto")
    return featurizer_conf.get("name") in GPU_FEATURIZERS and (
        device == "auto" or device.startswith("cuda"))


def _matcher_wants_gpu(matcher_conf: dict) -> bool:
    return str(matcher_conf.get("device") or "auto").startswith("cuda")


# --------------------------------------------------------------------------- worker side
def _prepare(source: bytes | str, path: str, conf: dict, name: str):
    """Decode and prepare one image: (None, PreparedImage) or (error, None).

    ``source`` is the file's bytes or, with a shared filesystem, its path. ImageReadError is a
    per-image outcome; another DiftSfmError stops the run (as it does locally).
    """
    from .extract import prepare_image
    from .images import read_image

    try:
        image = read_image(source) if isinstance(source, str) else decode_image(source, path)
        return None, prepare_image(image, conf, name)
    except DiftSfmError as err:
        return err, None


def _limit_threads(cpus: float) -> None:
    """Make torch and OpenCV use the CPUs the actor reserved (Ray sets OMP_NUM_THREADS)."""
    from .runtime import limit_threads

    limit_threads(int(cpus))


class DescribeWorker:
    """Actor body: holds one featurizer (model loaded once) and describes batches."""

    def __init__(self, conf: dict, cpus: float):
        from .featurizers import get_featurizer

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

    def describe(self, names: list[str], *prepared) -> list | DiftSfmError:
        """Describe one batch: [(image_size, keypoints, descriptors)] in the given order."""
        try:
            descs = self.featurizer.describe_batch([p.resized for p in prepared],
                                                   [p.keypoints_resized for p in prepared])
        except DiftSfmError as err:
            return err
        return [(p.image_size, p.keypoints, d) for p, d in zip(prepared, descs, strict=True)]


class MatchWorker:
    """Actor body: holds one matcher and matches blocks of pairs."""

    def __init__(self, matcher_conf: dict, cpus: float):
        from .matchers import get_matcher

        if cpus:
            _limit_threads(cpus)
        self.matcher = get_matcher(matcher_conf)

    def ready(self) -> None:
        return None

    def pid(self) -> int:
        return os.getpid()

    def match(self, pairs: list[tuple[int, int]], *descriptors: np.ndarray) -> list:
        """Match pairs of indices into ``descriptors``: [(matches0, scores0)] in order.

        Each image of the block is prepared (normalised, moved to the device) once, then
        ``pair_batch`` pairs go per batched call, as ``match.LocalBackend`` does.
        """
        prepare = getattr(self.matcher, "prepare", None)
        match_prepared = getattr(self.matcher, "match_prepared", None)
        if prepare is None or match_prepared is None:
            return [self.matcher(descriptors[i], descriptors[j]) for i, j in pairs]
        ready = [prepare(d) for d in descriptors]
        batch = max(1, int(getattr(self.matcher, "pair_batch", 1)))
        out: list = []
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            out += match_prepared([ready[i] for i, _ in chunk], [ready[j] for _, j in chunk])
        return out


# --------------------------------------------------------------------------- actors
class _Pool:
    """Model-holding actors, each with a count of calls in flight (least loaded first)."""

    def __init__(self, ray, body: type, args: tuple, count: int, gpu: bool, cpus: float,
                 label: str):
        self.ray = ray
        run = uuid.uuid4().hex[:8]
        options = {"num_gpus": 1 if gpu else 0, "num_cpus": 1 if gpu else cpus,
                   "max_restarts": -1, "max_task_retries": 3, "namespace": NAMESPACE}
        cls = ray.remote(body)
        self.actors = [cls.options(name=f"dift-sfm-{label}-{run}-{i}", **options)
                       .remote(*args, 0 if gpu else cpus) for i in range(count)]
        self.load = [0] * count
        try:
            errors = ray.get([a.ready.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        for err in errors:
            if err is not None:
                self.close()
                raise err

    def pick(self) -> int:
        i = min(range(len(self.actors)), key=self.load.__getitem__)
        self.load[i] += 1
        return i

    def done(self, i: int) -> None:
        self.load[i] -= 1

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already dead or disconnected: nothing to free
                self.ray.kill(actor)
        self.actors = []


def _cluster_plan(ray, gpu: bool, options: RayOptions, what: str) -> tuple[int, float]:
    """(number of actors, CPUs left over for prepare tasks)."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if gpu:
        if gpus < 1:
            raise RayClusterError(
                f"The Ray cluster has no GPU ({_describe_resources(resources)}) but {what} "
                "runs on CUDA: add GPU nodes, or pass --device cpu to run it on CPU actors.")
        count = min(gpus, options.workers) if options.workers else gpus
        return count, cpus - count
    count = options.workers or max(1, int(cpus // (2 * options.cpus_per_worker)))
    if count * options.cpus_per_worker > cpus:
        raise RayClusterError(
            f"--workers {count} needs {count * options.cpus_per_worker:g} CPUs but the Ray "
            f"cluster has {cpus:g}: use fewer workers or a larger cluster.")
    return count, cpus - count * options.cpus_per_worker


def _unwrap(result: Any) -> Any:
    """Re-raise a DiftSfmError that a worker returned as a value."""
    if isinstance(result, DiftSfmError):
        raise result
    return result


# --------------------------------------------------------------------------- extraction
class RayExtractBackend:
    """The extraction backend of ``extract_features`` on a Ray cluster.

    ``__call__(names)`` yields ``(name, Described | ImageReadError)`` in the order of ``names``.
    Connects (or starts a local cluster) and loads the models on first use with work to do;
    the actors are released when the call ends.
    """

    def __init__(self, conf: dict, image_dir: Path | str, options: RayOptions | None = None):
        self.conf, self.image_dir = conf, Path(image_dir)
        self.options = options or RayOptions()
        self.pool: _Pool | None = None
        self.stats: dict[str, float] = {}
        if conf["keypoints"].get("name") == "import" and not self.options.shared_fs:
            raise DiftSfmError(
                "keypoints.name=import reads a features file on the workers: with --ray it "
                "needs --ray-shared-fs (the file at the same path on every node).")

    def __call__(self, names: list[str]) -> Iterator[Any]:
        if not names:
            return
        ray = connect(self.options)
        fconf = self.conf["featurizer"]
        gpu = wants_gpu(fconf)
        count, spare = _cluster_plan(ray, gpu, self.options,
                                     f"featurizer '{fconf['name']}' (device "
                                     f"{fconf.get('device', 'auto')})")
        batch_size = max(1, int(fconf.get("batch_size") or 1))
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
        try:
            yield from self._run(ray, names, batch_size, window, prepare_task)
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
             prepare_task) -> Iterator[Any]:
        from .extract import Described

        pool = self.pool
        preparing: deque[tuple[str, Any, Any, int | None]] = deque()  # in order, not batched
        # in order: ("error", name, err) | ("batch", names, ref, actor index)
        outputs: deque[tuple] = deque()
        batch: list[tuple[str, Any]] = []
        submitted = in_flight = 0

        def flush() -> None:
            if batch:
                i = pool.pick()
                ref = pool.actors[i].describe.remote([n for n, _ in batch],
                                                     *[p for _, p in batch])
                outputs.append(("batch", [n for n, _ in batch], ref, i))
                batch.clear()

        while submitted < len(names) or preparing or batch or outputs:
            progressed = False
            while submitted < len(names) and in_flight < window:
                name = names[submitted]
                preparing.append((name, *self._submit_prepare(name, prepare_task)))
                submitted += 1
                in_flight += 1
                progressed = True
            # batch prepared images in order, as LocalBackend does (an error flushes)
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
                if isinstance(status, ImageReadError):
                    flush()
                    outputs.append(("error", name, status))
                elif isinstance(status, DiftSfmError):
                    raise status
                else:
                    batch.append((name, prepared))
                    if len(batch) >= batch_size:
                        flush()
            if not preparing and submitted == len(names):
                flush()
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
                for name, (size, kpts, desc) in zip(batch_names, results, strict=True):
                    in_flight -= 1
                    yield name, Described(name, tuple(size), kpts, desc)
            if not progressed:
                waiting = [r for r in ([preparing[0][1]] if preparing else [])
                           if not isinstance(r, DiftSfmError)]
                waiting += [o[2] for o in list(outputs)[:1] if o[0] == "batch"]
                if waiting:
                    ray.wait(waiting, num_returns=1, timeout=1.0)


# --------------------------------------------------------------------------- matching
def plan_blocks(pairs: Sequence[tuple[str, str]], block_images: int,
                max_pairs: int = 1024) -> list[tuple[list[str], list[int]]]:
    """Group pairs into blocks of at most ``block_images`` images (and ``max_pairs`` pairs).

    Images get positions by first appearance; a pair goes to the tile (pos0 // T, pos1 // T)
    with T = block_images // 2, so pairs sharing images land in the same block (an exhaustive
    window of r rows gives blocks of about r x T pairs for r + T images). Returns
    ``[(image names of the block, indices into pairs)]``.
    """
    half = max(1, block_images // 2)
    position: dict[str, int] = {}
    tiles: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
    for k, (a, b) in enumerate(pairs):
        pa = position.setdefault(a, len(position))
        pb = position.setdefault(b, len(position))
        tiles.setdefault((min(pa, pb) // half, max(pa, pb) // half), []).append(k)
    blocks: list[tuple[list[str], list[int]]] = []
    for members in tiles.values():
        for start in range(0, len(members), max_pairs):
            part = members[start:start + max_pairs]
            images = list(dict.fromkeys(n for k in part for n in pairs[k]))
            blocks.append((images, part))
    return blocks


class RayMatchBackend:
    """The matching backend of ``match_features`` on a Ray cluster.

    ``__call__(pairs, features)`` yields ``(pair, matches0, scores0)`` in the order of
    ``pairs``. The driver reads descriptors and puts each image's once per window into the
    object store; a block task receives each of its images once.
    """

    def __init__(self, matcher_conf: dict, options: RayOptions | None = None):
        self.matcher_conf = matcher_conf
        self.options = options or RayOptions()
        self.pool: _Pool | None = None
        self.stats: dict[str, float] = {}

    def __call__(self, pairs: list[tuple[str, str]], features) -> Iterator[Any]:
        if not pairs:
            return
        from .match import check_same_dim

        ray = connect(self.options)
        gpu = _matcher_wants_gpu(self.matcher_conf) or (
            self.matcher_conf.get("device", "auto") == "auto"
            and ray.cluster_resources().get("GPU", 0) >= 1)
        count, _ = _cluster_plan(ray, gpu, self.options,
                                 f"matcher (device {self.matcher_conf.get('device')})")
        t0 = time.perf_counter()
        self.pool = pool = _Pool(ray, MatchWorker, (self.matcher_conf,), count, gpu,
                                 self.options.cpus_per_worker, "match")
        self.stats = {"workers": count, "startup_s": time.perf_counter() - t0,
                      "bytes_shipped": 0, "bytes_to_workers": 0, "blocks": 0}
        self._cache: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._cached_bytes = 0
        max_blocks = self.options.max_in_flight or 2 * count + 2
        step = self.options.window_pairs
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        pending: deque[tuple[Any, list[int], int]] = deque()  # (ref, pair indices, actor)
        blocks: deque[tuple[list[str], list[int], dict[str, Any]]] = deque()
        next_window = next_yield = 0
        try:
            while next_yield < len(pairs):
                if not blocks and next_window < len(pairs) \
                        and next_window - next_yield < 2 * step:
                    part = pairs[next_window:next_window + step]
                    refs = self._put_descriptors(ray, features, part, check_same_dim)
                    for images, members in plan_blocks(part, self.options.block_images):
                        blocks.append((images, [next_window + k for k in members], refs))
                    next_window += len(part)
                while blocks and len(pending) < max_blocks:
                    images, members, refs = blocks.popleft()
                    index = {n: i for i, n in enumerate(images)}
                    local = [(index[pairs[k][0]], index[pairs[k][1]]) for k in members]
                    i = pool.pick()
                    pending.append((pool.actors[i].match.remote(local,
                                                                *[refs[n][0] for n in images]),
                                    members, i))
                    self.stats["blocks"] += 1
                    self.stats["bytes_to_workers"] += sum(refs[n][1] for n in images)
                if pending:
                    ready, _ = ray.wait([p[0] for p in pending], num_returns=1,
                                        timeout=0 if next_yield in results else 1.0)
                    for ref in ready:
                        j = next(j for j, p in enumerate(pending) if p[0] == ref)
                        _, members, i = pending[j]
                        del pending[j]
                        pool.done(i)
                        for k, result in zip(members, ray.get(ref), strict=True):
                            results[k] = result
                while next_yield in results:
                    m0, s0 = results.pop(next_yield)
                    yield pairs[next_yield], m0, s0
                    next_yield += 1
        finally:
            pool.close()
            self._cache.clear()

    def _put_descriptors(self, ray, features, part, check_same_dim) -> dict[str, Any]:
        """(object ref, bytes) of the descriptors of every image of a window: read from the
        features file and put into the object store once, or reused from the cache."""
        refs: dict[str, tuple[Any, int]] = {}
        dims: dict[str, int] = {}
        for name0, name1 in part:
            for name in (name0, name1):
                if name in refs:
                    continue
                if name in self._cache:
                    self._cache.move_to_end(name)
                    refs[name] = self._cache[name]
                    dims[name] = refs[name][2]
                    continue
                desc = features.descriptors(name)
                self.stats["bytes_shipped"] += desc.nbytes
                refs[name] = self._cache[name] = (ray.put(desc), desc.nbytes, desc.shape[1])
                dims[name] = desc.shape[1]
                self._cached_bytes += desc.nbytes
            if dims[name0] != dims[name1]:
                check_same_dim(features, name0, np.empty((0, dims[name0])), name1,
                               np.empty((0, dims[name1])))
        budget = self.options.descriptor_cache_mb * 2**20
        while self._cached_bytes > budget and self._cache:
            name, entry = next(iter(self._cache.items()))
            if name in refs:
                break  # everything older is in use by this window
            self._cache.popitem(last=False)
            self._cached_bytes -= entry[1]
        return refs


# --------------------------------------------------------------------------- helpers
def worker_pids(backend: RayExtractBackend | RayMatchBackend) -> list[int]:
    """Process ids of a running backend's actors (for tests and diagnostics)."""
    ray = import_ray()
    if backend.pool is None:
        return []
    return ray.get([a.pid.remote() for a in backend.pool.actors])


def shutdown() -> None:
    """Disconnect from Ray (stopping the local cluster this process started, if any)."""
    ray = import_ray()
    if ray.is_initialized():
        ray.shutdown()
