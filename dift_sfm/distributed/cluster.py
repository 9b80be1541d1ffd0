"""The Ray cluster: connection (or a local cluster), its resources, and the actor pool that
both backends use (``RayOptions`` says how much of the cluster to use)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import interrupts
from ..errors import DiftSfmError
from ..runtime import limit_threads, wants_cuda

if TYPE_CHECKING:
    from .extract import RayExtractBackend
    from .match import RayMatchBackend

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
    interrupts.reinstall()  # ray.init replaced our SIGTERM handler (sys.exit(15))
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
    ``auto`` (a cluster is assumed to have CUDA) or names CUDA (``runtime.wants_cuda``)."""
    return featurizer_conf.get("name") in GPU_FEATURIZERS and wants_cuda(
        featurizer_conf.get("device"), cuda_available=True)


def _limit_threads(cpus: float) -> None:
    """Make torch and OpenCV use the CPUs the actor reserved (Ray sets OMP_NUM_THREADS)."""
    limit_threads(int(cpus))


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
