"""The one rule that decides whether an existing output may be extended (resumed), and with
it the one notion of "the same settings".

Every step that resumes an output (``extract``, ``match``, ``hpatches``, ``pose-bench``,
``reconstruct``, ``colmap-import``) stores the settings that shaped its results beside them and
asks :func:`may_resume` before reusing anything. Settings that only change speed or placement
(``RUNTIME_KEYS``) never block a resume; any other difference is refused with a message that
names the file, the differing keys, and how to proceed. The benchmarks' cache names
(:func:`settings_tag`, used by ``eval.cache.conf_tag``) hash the same significant settings.

Which sections a conf has (``CONF_SECTIONS``: the sections ``confs`` resolves and a features
file stores) and which of them shape a features file (``FEATURE_SECTIONS``) are listed here.

names the file, the differing keys, and how to proceed. Settings that only choose how
results are stored (``STORAGE_KEYS``, e.g. float16 descriptors) follow the existing output
(:func:`follow_stored`), so that one file never mixes two storage formats.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import FormatError

logger = logging.getLogger("dift_sfm")

#: Conf keys that change how fast or where a result is computed, never the result itself.
RUNTIME_KEYS = frozenset(
    {
        "batch_size",
        "cache_mb",  # matcher: descriptors kept resident between pairs
        "chunk_size",
        "compile",
        "compile_mode",
        "compile_dynamic_batch",
        "channels_last",
        "device",
        "fp16",  # matcher: fp16 products on CUDA; scores stay exact fp32, near-ties may differ
        "memory_mb",  # preprocessing: budget per image; refuses images, changes no entry
        "num_workers",
        "pair_batch",
        "prefetch",
        "worker_type",
    }
)


#: The sections of a complete conf, in order (``confs.resolve_conf`` fills each from its
#: component's defaults; ``extract`` stores all of them in a features file's ``conf_json``).
CONF_SECTIONS = ("preprocessing", "keypoints", "featurizer", "matcher", "pca")
#: The sections that decide a features file's content (all but the matcher's).
FEATURE_SECTIONS = tuple(s for s in CONF_SECTIONS if s != "matcher")

#: Conf keys that choose how results are stored on disk, not what they are: an existing
#: output keeps its own value when it is resumed (``follow_stored``); ``--overwrite`` or a new
#: output applies the run's value.
STORAGE_KEYS = frozenset(
    {
        "as_half",  # preprocessing: descriptors stored as float16 (keypoints stay float32)
    }
)


class StaleOutputError(FormatError):
    """An existing output was computed from other inputs or settings than this run's."""


def significant(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (nested dicts) without the ``RUNTIME_KEYS``, as JSON-normalised data."""

    def strip(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: strip(v) for k, v in node.items() if k not in RUNTIME_KEYS}
        return node

    return json.loads(json.dumps(strip(settings)))


def settings_tag(settings: Mapping[str, Any]) -> str:
    """8 hex digits that change exactly when the significant ``settings`` (runtime keys aside,
    as for :func:`may_resume`) change."""
    blob = json.dumps(significant(settings), sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested settings dicts (runtime keys ignored)."""
    old, new = significant(old), significant(new)
    diff: list[str] = []
    if old.get("name") != new.get("name"):  # another component: its options do not compare
        return [f"{prefix}name: {json.dumps(old.get('name'))} -> {json.dumps(new.get('name'))}"]
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diff.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return diff


def may_resume(
    path: Path | str,
    stored: Mapping[str, Any] | None,
    wanted: Mapping[str, Any],
    overwrite: bool,
    what: str = "output",
    written_by: str | None = None,
) -> bool:
    """Whether the entries already in ``path`` may be kept (and extended) by this run.

    Args:
        path: the existing output (file or folder); absent means there is nothing to keep.
        stored: the settings recorded in it (None: it records none, e.g. written by hloc).
        wanted: this run's settings, same layout.
        overwrite: the user asked to recompute; then an output with other settings is
            replaced instead of refused (which entries to recompute is the caller's business).
        what: how to call the output in messages ("features file", "matches file", ...).
        written_by: the name of the conf that wrote it, for messages.

    Returns True when the stored settings equal the wanted ones (runtime keys aside) or record
    nothing, False when there is no output or ``overwrite`` replaces a different one. Raises
    StaleOutputError when they differ and ``overwrite`` is not set.
    """
    path = Path(path)
    if not path.exists():
        return False
    diff = [] if stored is None else settings_diff(stored, wanted)
    if not diff:
        return True
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    if written_by:
        shown = f"written by conf '{written_by}'; {shown}"
    if overwrite:
        logger.warning(
            "Replacing the %s %s: it was computed with other settings (%s).", what, path, shown
        )
        return False
    raise StaleOutputError(
        f"The {what} {path} was computed with other settings than this run's ({shown}). "
        "Use --overwrite to recompute it, or write to another output."
    )


def follow_stored(
    stored: Mapping[str, Any] | None,
    wanted: Mapping[str, Any],
    path: Path | str,
    what: str = "output",
    log: bool = True,
) -> dict[str, Any]:
    """``wanted`` (nested settings) with the ``STORAGE_KEYS`` values recorded in ``stored``.

    An existing output resumes under its own storage settings: new entries are stored as the
    old ones are (never a file half float32, half float16). With ``log``, each adopted value is
    logged as a warning naming the file and how to change it. A key that ``stored`` does not
    record keeps ``wanted``'s value (and the resume rule then judges the difference).
    """
    out = json.loads(json.dumps(wanted))
    if stored is None:
        return out

    def walk(old: Mapping[str, Any], new: dict[str, Any], prefix: str) -> None:
        for key, value in new.items():
            if key not in old:
                continue
            if isinstance(value, dict) and isinstance(old[key], Mapping):
                walk(old[key], value, f"{prefix}{key}.")
            elif key in STORAGE_KEYS and old[key] != value:
                if log:
                    logger.warning(
                        "The %s %s stores its entries with %s%s=%s: new entries follow it, not "
                        "this run's %s (use --overwrite or another output to change it).", what,
                        path, prefix, key, json.dumps(old[key]), json.dumps(value))
                new[key] = old[key]

    walk(stored, out, "")
    return out
