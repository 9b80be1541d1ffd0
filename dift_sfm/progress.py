"""Progress bars that follow the log level: `dift-sfm -q` silences them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable)``, hidden when the ``dift_sfm`` logger is quieter than INFO (``None``:
    a bar moved with ``update``)."""
    quiet = logging.getLogger("dift_sfm").getEffectiveLevel() > logging.INFO
    return tqdm(iterable, disable=disable or quiet, **kwargs)
