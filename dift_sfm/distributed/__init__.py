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
Images are grouped into featurizer batches by the rule ``extract.LocalBackend`` follows
(``dift_sfm.planning``), so batched featurizers give identical numbers. At most
``max_in_flight`` images are between "submitted" and "yielded" at any time, so memory does not
grow with the number of images.

Matching: the driver cuts the pairs (in their order) into windows, and each window into blocks
of at most ``block_images`` images; each image's descriptors go to the object store once per
window and to a worker once per block, never once per pair.

Faults: actors restart when their process dies (``max_restarts``) and Ray re-runs their
in-flight calls (``max_task_retries``); prepare tasks are retried by Ray. A dead driver leaves
the usual shards: the next run, with or without ``--ray``, resumes from them.

Modules, one job each: ``cluster`` (connection or local cluster, resources, the actor pool),
``extract`` (``RayExtractBackend`` and its workers), ``match`` (``RayMatchBackend`` and its
workers). The cutting of work into batches, tiles and blocks, and the descriptor cache, are
``dift_sfm.planning``'s, shared with the local backends. The Ray backends never write: the
driver's one write loop is the step's own (``extract.extract_features``,
``match.match_features``), which consumes what a backend yields.

Ray is imported only when a backend first runs (``pip install "dift-sfm[ray]"``).
"""

from ..planning import plan_blocks
from .cluster import (
    GPU_FEATURIZERS,
    NAMESPACE,
    RayClusterError,
    RayOptions,
    RayUnavailableError,
    connect,
    import_ray,
    shutdown,
    wants_gpu,
    worker_pids,
)
from .extract import DescribeWorker, RayExtractBackend
from .match import MatchWorker, RayMatchBackend

__all__ = ["GPU_FEATURIZERS", "NAMESPACE", "DescribeWorker", "MatchWorker", "RayClusterError",
           "RayExtractBackend", "RayMatchBackend", "RayOptions", "RayUnavailableError",
           "connect", "import_ray", "plan_blocks", "shutdown", "wants_gpu", "worker_pids"]
