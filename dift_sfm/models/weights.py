"""Getting weights, for every model: reading weight files, the hub's offline switch and a
load timer. Files go to the one cache folder, ``dift_sfm.runtime.cache_dir()``."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import logger
from ..errors import ModelLoadError

_TRUE = ("1", "true", "yes", "on")


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


__all__ = ["Timer", "go_offline_if_unreachable", "offline", "read_state_dict"]
