"""Image pairs: hloc's pairs.txt format (``name0 name1`` per line) and simple generators."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import FormatError

#: The pair strategies of ``dift-sfm pairs`` / ``reconstruct`` (``retrieval``: :mod:`.retrieval`).
PAIR_STRATEGIES = ("exhaustive", "sequential", "retrieval")


def read_pairs(path: Path | str, known_names: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Read a pairs file; blank lines and '#' comments are skipped, duplicates dropped.

    Raises FormatError naming the file and line for malformed lines, self-pairs, and (if
    ``known_names`` is given) names that are not among them. Names cannot contain spaces
    (hloc's format splits on whitespace).
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"Pairs file {path} does not exist.")
    known = set(known_names) if known_names is not None else None
    pairs: list[tuple[str, str]] = []
    seen: set[frozenset[str]] = set()
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise FormatError(f"{path}:{lineno}: expected 'name0 name1', got '{line}'.")
        name0, name1 = parts
        if name0 == name1:
            raise FormatError(f"{path}:{lineno}: pair of an image with itself ('{name0}').")
        if known is not None:
            for name in (name0, name1):
                if name not in known:
                    raise FormatError(f"{path}:{lineno}: image '{name}' is not in the "
                                      "features file.")
        key = frozenset((name0, name1))
        if key not in seen:
            seen.add(key)
            pairs.append((name0, name1))
    return pairs


def write_pairs(path: Path | str, pairs: Iterable[tuple[str, str]]) -> None:
    """Write pairs, one ``name0 name1`` line each, no blank lines (hloc chokes on them)."""
    pairs = list(pairs)
    for a, b in pairs:
        if any(c.isspace() for c in a + b):
            raise FormatError(
                f"Image names with whitespace cannot go in a pairs file: '{a}', '{b}'.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    tmp.replace(path)


def exhaustive_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every unordered pair (i < j) of ``names``, in order."""
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def sequential_pairs(names: list[str], window: int = 5,
                     wrap: bool = False) -> list[tuple[str, str]]:
    """Each image with the ``window`` images after it (video / ordered captures).

    With ``wrap`` the sequence is a loop: the last images also pair with the first ones.
    """
    if window < 1:
        raise ValueError("window must be at least 1")
    n = len(names)
    pairs: list[tuple[str, str]] = []
    seen: set[frozenset[int]] = set()
    for i in range(n):
        for k in range(1, window + 1):
            j = i + k
            if j >= n:
                if not wrap:
                    break
                j %= n
            key = frozenset((i, j))
            if i != j and key not in seen:
                seen.add(key)
                pairs.append((names[i], names[j]))
    return pairs
