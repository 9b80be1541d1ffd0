"""Matchers by conf name (``conf['matcher']['name']``); each class holds its ``default_conf``."""

from __future__ import annotations

import copy

from ..errors import DiftSfmError
from .base import Matcher
from .mnn import MNN, mutual_nearest_neighbours

MATCHERS = {"mnn": MNN}


def _matcher_class(name: str | None) -> type:
    if name not in MATCHERS:
        raise DiftSfmError(f"Unknown matcher '{name}'. Available: {', '.join(MATCHERS)}.")
    return MATCHERS[name]


def matcher_defaults(name: str) -> dict:
    """A copy of the named matcher's ``default_conf``."""
    return copy.deepcopy(_matcher_class(name).default_conf)


def get_matcher(conf: dict) -> Matcher:
    """Build the matcher named by ``conf['name']`` with the rest of ``conf`` as settings."""
    return _matcher_class(conf.get("name"))(conf)


__all__ = ["MATCHERS", "MNN", "Matcher", "get_matcher", "matcher_defaults",
           "mutual_nearest_neighbours"]
