"""The interface every matcher offers, and that both matching backends (``match.LocalBackend``,
the Ray match workers) call: a typed protocol instead of optional attributes probed at run time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Matcher(Protocol):
    """A matcher built from its conf section (``matcher.name`` picks the class).

    Attributes:
        conf: the complete matcher conf (its ``default_conf`` with the given keys applied).
        device: where it computes; a backend overlaps its writing with matching off the CPU.
        pair_batch: pairs per ``match_prepared`` call (``planning.pair_batches``).
    """

    conf: dict
    device: torch.device
    pair_batch: int

    def __call__(self, desc0: np.ndarray, desc1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Match (N0, D) against (N1, D): (matches0 (N0,) int64 or -1, scores0 (N0,) float32)."""
        ...

    def prepare(self, desc: np.ndarray) -> Any:
        """One image's (N, D) descriptors as ``match_prepared`` takes them (kept and reused for
        every pair of that image; its size in bytes is about ``desc.size * 4``)."""
        ...

    def match_prepared(self, desc0: Sequence[Any], desc1: Sequence[Any]
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``__call__`` for pairs (desc0[b], desc1[b]) of prepared descriptors, in order."""
        ...

    def cache_bytes(self) -> int:
        """Bytes of prepared descriptors a backend may keep resident (its ``cache_mb``)."""
        ...
