"""Model files shared by every model: the cache folder, the offline switch, weight files and the
persistent ``torch.compile`` cache.

One cache folder for everything dift-sfm downloads or derives: ``$DIFT_SFM_CACHE``, default
``~/.cache/dift_sfm``, holding ``prompt_embeds/`` (SD), the ADM checkpoint and
``torch_compile/`` (inductor/triton kernels, so compiling costs once per machine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import logger
from ..errors import ModelLoadError

CACHE_ENV = "DIFT_SFM_CACHE"
_TRUE = ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """``$DIFT_SFM_CACHE`` if set, else ``~/.cache/dift_sfm``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dift_sfm").expanduser()


def go_offline_if_unreachable(timeout: float = 3.0) -> bool:
    """Probe the Hugging Face endpoint once; when it cannot be reached, switch this process to
    offline mode (cached files still load) instead of retrying for half a minute per file.

    Returns whether the process is offline now.
    """
    if offline():
        return True
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return False
    except OSError:
        logger.warning("The Hugging Face hub (%s) is unreachable: using only cached files "
                       "(as with HF_HUB_OFFLINE=1).", url.hostname)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:  # huggingface_hub reads the switch from its constants module at call time
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return True


def offline() -> bool:
    """Whether downloads are disabled (``DIFT_SFM_OFFLINE`` or ``HF_HUB_OFFLINE`` set true)."""
    return any(os.environ.get(k, "").lower() in _TRUE
               for k in ("DIFT_SFM_OFFLINE", "HF_HUB_OFFLINE"))


def read_state_dict(path: str | os.PathLike, device: torch.device | str = "cpu",
                    what: str = "weights file") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle, read straight onto ``device``.

    safetensors are read with ``device=`` (no CPU copy on the way to a GPU); pickles are
    memory-mapped (``weights_only``) and a ``{"state_dict": ...}`` wrapper is unwrapped.
    Raises ModelLoadError naming the file.
    """
    path = Path(path)
    device = str(device)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device=device)
        else:
            try:  # mmap: no second copy of a large checkpoint in memory
                state = torch.load(path, map_location=device, weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be mmap-ed
                state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"Could not read {what} '{path}': {err}. Is the file complete? "
                             f"Delete it and download it again.") from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{what.capitalize()} '{path}' does not hold a state dict.")
    return dict(state)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``: wall time of a block (load-time logs)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


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


__all__ = ["CACHE_ENV", "Timer", "cache_dir", "offline", "read_state_dict",
           "setup_compile_cache"]
