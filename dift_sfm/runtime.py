"""Where and how computations run: devices, dtypes, speed-up switches, CPU threads, memory
budgets, compiling and out-of-memory fallbacks. Featurizers, matchers and backends ask here.

The thread policy (``THREAD_ENV``, applied by ``import dift_sfm`` before torch loads):
torch's OpenMP workers spin-wait at the end of each parallel region by default; when another
process takes a core, the thread that holds the rest of the work is descheduled while its
partner spins on the other core, and every small parallel region waits a scheduler time
slice (matching became 50-150x slower beside one busy process on 2 cores). Sleeping at once
(``OMP_WAIT_POLICY=PASSIVE``) cures that but costs on a quiet machine, where every small
parallel region then wakes its threads (matching 1.7x slower alone, measured on a 2-core VM).
So waiting threads spin briefly, then sleep: ``GOMP_SPINCOUNT=1000`` for GNU OpenMP (torch's
Linux wheels; its default is 300,000) and ``KMP_BLOCKTIME=0`` for Intel's / LLVM's runtime.
Throughput then follows the cores a process still gets, and a quiet run costs about what it
did (docs/benchmarks.md, "CPU contention"). Values the user set are never overridden
(``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME``, ``OMP_NUM_THREADS``, explicit
``torch.set_num_threads``).

This module imports torch only inside its functions, so that ``dift_sfm/__init__`` can apply
the thread policy before torch is imported.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import DiftSfmError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("dift_sfm")
T = TypeVar("T")

# --------------------------------------------------------------------------- threads
#: The thread policy: environment variables set before torch (and its OpenMP runtime) loads,
#: each only where the user has not set it. The one place of this default.
THREAD_ENV: dict[str, str] = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
#: Variables that, when the user set any of them, mean "the user chose the OpenMP waiting
#: behaviour": the policy then leaves the process alone.
_USER_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
#: What ``apply_thread_policy`` did in this process (for logs, tests and benchmarks).
thread_policy_state: dict[str, Any] = {}


def thread_env() -> dict[str, str]:
    """The OpenMP waiting settings of this process (the user's, where they chose any, else the
    policy's): what a child process or a Ray worker should get."""
    chosen = {k: os.environ[k] for k in _USER_WAIT_VARS if k in os.environ}
    return chosen or dict(THREAD_ENV)


def apply_thread_policy() -> dict[str, Any]:
    """Apply ``THREAD_ENV`` to this process; called by ``import dift_sfm``, idempotent.

    Before torch is imported: each variable is set with ``os.environ.setdefault``, so the
    OpenMP runtime that torch loads reads it. When torch was imported first (a user script
    that imports torch before dift_sfm) and the user chose neither a waiting policy nor a
    thread count, the waiting policy can no longer change, so torch's intra-op threads are
    reduced to one (no thread ever waits on another), logged at debug level: import dift_sfm
    first, or set ``GOMP_SPINCOUNT=1000`` yourself, to keep every core.

    Returns ``thread_policy_state``: ``env`` (variables set here), ``torch_first`` and
    ``num_threads`` (set at runtime, or None).
    """
    if thread_policy_state:
        return thread_policy_state
    user_chose_wait = any(k in os.environ for k in _USER_WAIT_VARS)
    torch_first = "torch" in sys.modules
    state: dict[str, Any] = {"env": {}, "torch_first": torch_first, "num_threads": None}
    if not torch_first:
        for key, value in THREAD_ENV.items():
            if not user_chose_wait:
                os.environ[key] = value
                state["env"][key] = value
    elif not user_chose_wait and "OMP_NUM_THREADS" not in os.environ:
        import torch

        if torch.get_num_threads() == _default_torch_threads() and torch.get_num_threads() > 1:
            torch.set_num_threads(1)
            state["num_threads"] = 1
            logger.debug("torch was imported before dift_sfm, so its OpenMP threads keep "
                         "spin-waiting (OMP_WAIT_POLICY could not be set): using one intra-op "
                         "thread. Import dift_sfm first or set GOMP_SPINCOUNT=1000 to use "
                         "every core.")
    thread_policy_state.update(state)
    return thread_policy_state


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS tells), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _default_torch_threads() -> int:
    """The intra-op thread count torch picks by itself (one per core it may use)."""
    return available_cpus()


def limit_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch (intra-op) and OpenCV: a worker that reserved ``n``
    CPUs (a Ray actor) or was told so."""
    n = max(1, int(n))
    import torch

    torch.set_num_threads(n)
    set_opencv_threads(n)


def set_opencv_threads(n: int) -> int:
    """Set OpenCV's thread count (process-wide); returns the previous one."""
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(max(1, int(n)))
    return previous


def pool_opencv_threads(workers: int) -> int | None:
    """OpenCV threads while a preparation pool of ``workers`` runs: the cores shared among the
    workers (1 with the default pool of one worker per core), so pool threads times OpenCV
    threads do not exceed the cores. None (leave OpenCV alone) for fewer than 2 workers."""
    return max(1, available_cpus() // workers) if workers >= 2 else None


def ray_runtime_env(runtime_env: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Ray ``runtime_env`` whose workers get ``thread_env()``; variables already in
    ``runtime_env['env_vars']`` win (Ray itself sets ``OMP_NUM_THREADS`` per actor)."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**thread_env(), **dict(env.get("env_vars") or {})}
    return env


# --------------------------------------------------------------------------- devices, dtypes
def wants_cuda(device: str | None, cuda_available: bool) -> bool:
    """The GPU 'auto' rule: ``device`` 'auto' (or None) runs on CUDA when CUDA is available
    (here, or in a cluster); a name starting with 'cuda' always does; anything else never."""
    name = str(device or "auto")
    return name.startswith("cuda") or (name == "auto" and cuda_available)


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' -> CUDA if available, else MPS, else CPU; anything else is passed to torch.

    An unknown name, or CUDA where this torch has none, is a DiftSfmError that says why.
    """
    import torch

    if name in (None, "auto"):
        if wants_cuda(name, torch.cuda.is_available()):
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise DiftSfmError(f"Unknown device '{name}': use auto, cpu, cuda, cuda:N or mps.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA GPU is visible to it")
        raise DiftSfmError(f"Device '{name}' is not available: {why}. Use device cpu or auto.")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA (fp32 where it matters is the model's job), float32 elsewhere.

    On CPUs without native bf16 (AVX2 only) bf16 is far slower than fp32, hence fp32 there.
    """
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"Unknown dtype '{name}', expected one of {sorted(table)} or 'auto'.")
    return table[name]


def resolve_flag(value: bool | str | None, device: torch.device) -> bool:
    """A speed-up switch: 'auto' (or None) -> on for CUDA only; else the boolean value."""
    if value in (None, "auto"):
        return device.type == "cuda"
    if isinstance(value, str):
        if value.lower() in ("true", "on", "1", "yes"):
            return True
        if value.lower() in ("false", "off", "0", "no"):
            return False
        raise DiftSfmError(f"Expected true, false or 'auto', got '{value}'.")
    return bool(value)


def cuda_speedups(device: torch.device) -> None:
    """Global cuDNN setting for fixed input shapes on CUDA: autotune convolution algorithms."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _oom_error() -> type[Exception]:
    """CUDA's (and other accelerators') out-of-memory error: ``torch.OutOfMemoryError``, or
    ``torch.cuda.OutOfMemoryError`` in older torch (which lacks the first name)."""
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def __getattr__(name: str) -> Any:
    """``runtime.OutOfMemoryError`` (``_oom_error()``), resolved on first use so that importing
    this module does not import torch."""
    if name == "OutOfMemoryError":
        globals()[name] = error = _oom_error()
        return error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- memory
#: Share of the free device memory (CUDA) or available RAM (elsewhere) that a budget of
#: 'auto' gives, and the budget when the available RAM is unknown.
CUDA_CACHE_SHARE, RAM_CACHE_SHARE, FALLBACK_CACHE_BYTES = 0.4, 0.25, 2 * 2**30


def cache_budget(cache_mb: int | float | str | None, device: torch.device | str,
                 what: str = "matcher.cache_mb") -> int:
    """Bytes a run may keep resident (e.g. prepared descriptors, ``matcher.cache_mb``).

    An int is MiB. 'auto' (or None): on CUDA ``CUDA_CACHE_SHARE`` of the device's free memory
    now; elsewhere ``RAM_CACHE_SHARE`` of the available RAM (``FALLBACK_CACHE_BYTES`` where
    the OS does not tell). ``what`` names the setting in the ValueError of a bad value.
    """
    if cache_mb not in (None, "auto"):
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float)) or cache_mb < 0:
            raise ValueError(f"{what} must be 'auto' or MiB >= 0, got {cache_mb!r}.")
        return int(cache_mb * 2**20)
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(CUDA_CACHE_SHARE * free)
        except (RuntimeError, AssertionError) as err:  # no usable CUDA: fall through to RAM
            logger.debug("No CUDA memory info (%s); sizing the cache from RAM.", err)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # e.g. macOS, Windows
        return FALLBACK_CACHE_BYTES
    return int(RAM_CACHE_SHARE * avail) if avail > 0 else FALLBACK_CACHE_BYTES


def halve_on_oom(run: Callable[[int], T], chunk: int, device: torch.device | None = None
                 ) -> tuple[T, int]:
    """``run(chunk)``; on out-of-memory halve ``chunk`` and retry, until 1 fails too.

    Returns (result, the chunk that fitted): callers keep it for the next calls.
    """
    import torch

    oom = _oom_error()
    chunk = max(1, int(chunk))
    while True:
        try:
            return run(chunk), chunk
        except oom:
            if chunk == 1:
                raise
        # Outside the except block, so the failed call's tensors are freed before the retry.
        chunk = max(1, chunk // 2)
        logger.warning("Out of GPU memory: retrying with chunk_size=%d.", chunk)
        if (device is None or device.type == "cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- compiling
#: Environment variable of the cache folder of everything dift-sfm downloads or derives.
CACHE_ENV = "DIFT_SFM_CACHE"


def cache_dir() -> Path:
    """``$DIFT_SFM_CACHE`` if set, else ``~/.cache/dift_sfm``: one folder for everything
    dift-sfm downloads or derives (``prompt_embeds/`` of SD, the ADM checkpoint,
    ``torch_compile/``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dift_sfm").expanduser()


def setup_compile_cache() -> Path:
    """Make ``torch.compile`` results persistent under ``cache_dir()/torch_compile``.

    Sets ``TORCHINDUCTOR_CACHE_DIR`` (inductor's FX-graph and triton kernel caches live below it)
    unless the user set it to a folder of their own, and enables the FX-graph and AOTAutograd
    caches, so a second process on the same machine reuses the compiled kernels.
    """
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # inductor writes its /tmp default into the variable once it has used it
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if given and os.path.abspath(given) == os.path.abspath(default_cache_dir()):
            given = None
    except Exception:
        pass
    folder = Path(given or cache_dir() / "torch_compile")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    except OSError as err:
        logger.warning("Cannot create the compile cache %s (%s): compiling will not be "
                       "reused across runs.", folder, err)
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        if hasattr(functorch_config, "enable_autograd_cache"):
            functorch_config.enable_autograd_cache = True
    except Exception as err:  # an old or stripped torch: compiling still works, uncached
        logger.debug("Compile cache settings not applied: %s", err)
    return folder


def _raise_recompile_limit(limit: int) -> None:
    """Raise dynamo's per-function recompile limit (``cache_size_limit`` before torch 2.6)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(dynamo_config, name, None), int):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
            return


def _mark_batch_dynamic(values: Sequence[Any]) -> None:
    """``maybe_mark_dynamic`` dim 0 of the tensors in ``values`` (recursing into tuples/lists)."""
    import torch

    for x in values:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        elif isinstance(x, (tuple, list)):
            _mark_batch_dynamic(x)


class Compiler:
    """``torch.compile`` modules or methods in place, with a way back to eager mode.

    ``run(fn)`` calls ``fn()``; if it fails while something is compiled (a compiler or backend
    error, e.g. no C++ compiler or triton), the compiled parts are restored to eager with a
    logged warning and ``fn()`` is run again. Out-of-memory and DiftSfmError pass through.
    """

    #: dynamo's per-function cache entries (recompile_limit) at least: blocks of one class share
    #: a code object, one entry per instance and shape, and past the limit dynamo runs it eagerly
    RECOMPILE_LIMIT = 64

    def __init__(self, what: str, mode: str | None = None, backend: str | Callable = "inductor",
                 dynamic_batch: bool = False):
        self.what, self.mode, self.backend = what, mode, backend
        self.dynamic_batch = dynamic_batch
        self._undo: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        """Whether something is compiled (False again after a fallback to eager)."""
        return bool(self._undo)

    def _options(self) -> dict[str, Any]:
        return {"dynamic": False, "backend": self.backend,
                **({"mode": self.mode} if self.mode else {})}

    def module(self, module: torch.nn.Module) -> None:
        """Compile ``module``'s calls (its hooks stay outside the compiled graph's caller).

        With ``dynamic_batch`` the first dim of every tensor argument (also in tuples and lists)
        is marked dynamic before each call, so one graph serves every batch size > 1 (size 1 is
        specialised by dynamo) and the persistent cache serves other batch sizes too.
        """
        import torch

        _raise_recompile_limit(self.RECOMPILE_LIMIT)
        if not self.dynamic_batch:
            module.compile(**self._options())
        else:
            compiled = torch.compile(module._call_impl, **self._options())

            def call(*args: Any, **kwargs: Any) -> Any:
                _mark_batch_dynamic(args)
                _mark_batch_dynamic(tuple(kwargs.values()))
                return compiled(*args, **kwargs)

            module._compiled_call_impl = call

        def undo() -> None:
            module._compiled_call_impl = None

        self._undo.append(undo)

    def method(self, obj: Any, name: str) -> None:
        """Replace the bound method ``obj.name`` by its compiled version."""
        import torch

        setattr(obj, name, torch.compile(getattr(obj, name), **self._options()))
        self._undo.append(lambda: delattr(obj, name))

    def to_eager(self) -> None:
        """Restore every compiled module and method."""
        while self._undo:
            self._undo.pop()()

    def run(self, fn: Callable[[], T]) -> T:
        if not self._undo:
            return fn()
        try:
            return fn()
        except (_oom_error(), DiftSfmError):
            raise
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            logger.warning("torch.compile of %s failed (%s: %s); running it eagerly instead.",
                           self.what, type(err).__name__, reason)
            self.to_eager()
            return fn()


__all__ = ["CACHE_ENV", "Compiler", "THREAD_ENV", "apply_thread_policy", "available_cpus",
           "cache_budget", "cache_dir", "cuda_speedups", "halve_on_oom", "limit_threads",
           "pool_opencv_threads", "ray_runtime_env", "resolve_device", "resolve_dtype",
           "resolve_flag", "set_opencv_threads", "setup_compile_cache", "thread_env",
           "wants_cuda"]
