"""Image pairs: hloc's pairs.txt format (``name0 name1`` per line), the generators, and
``generate_pairs``, the one dispatcher of the pair strategies (CLI ``pairs`` and
``reconstruct`` both call it; ``retrieval`` pairs come from :mod:`.retrieval`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import DiftSfmError, FormatError

#: The pair strategies of ``dift-sfm pairs`` / ``reconstruct`` (``retrieval``: :mod:`.retrieval`).
PAIR_STRATEGIES = ("exhaustive", "sequential", "retrieval")
#: ``sequential``: each image is paired with this many images after it
SEQUENTIAL_WINDOW = 5


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
    check_pairable({n for p in pairs for n in p}, f"pairs file {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    tmp.replace(path)


def check_pairable(names: Iterable[str], source: str = "the image list") -> None:
    """Refuse (FormatError naming the first such file) image names holding whitespace: a pairs
    file (hloc: ``name0 name1`` per line) cannot hold them."""
    bad = sorted(n for n in names if any(c.isspace() for c in n))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise FormatError(f"Image '{bad[0]}'{more} of {source} has whitespace in its name, which "
                          "a pairs file ('name0 name1' per line, hloc) cannot hold: rename the "
                          "file(s) or leave them out with --image-list.")


def exhaustive_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every unordered pair (i < j) of ``names``, in order."""
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def sequential_pairs(names: list[str], window: int = SEQUENTIAL_WINDOW,
                     wrap: bool = False) -> list[tuple[str, str]]:
    """Each image with the ``window`` images after it (video / ordered captures).

    With ``wrap`` the sequence is a loop: the last images also pair with the first ones.
    """
    check_pair_args(window=window)
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


def check_pair_args(strategy: str | None = None, window: int | None = None,
                    num_neighbors: int | None = None) -> None:
    """Refuse an unknown strategy, a window or a neighbour count under 1 (DiftSfmError), before
    any work. ``strategy`` may also be an existing pairs file."""
    if strategy is not None and strategy not in PAIR_STRATEGIES and not Path(strategy).is_file():
        raise DiftSfmError(f"--pairs must be one of {', '.join(PAIR_STRATEGIES)} or an "
                           f"existing pairs file; '{strategy}' is neither.")
    for option, value in (("--window", window), ("--num-neighbors", num_neighbors)):
        if value is not None and value < 1:
            raise DiftSfmError(f"{option} must be at least 1, got {value}.")


def generate_pairs(strategy: str, names: list[str], window: int | None = None,
                   wrap: bool = False, num_neighbors: int | None = None,
                   feature_path: Path | str | None = None, image_dir: Path | str | None = None,
                   retrieval_method: str | None = None) -> tuple[list[tuple[str, str]], str]:
    """The pairs of ``names`` for a strategy of PAIR_STRATEGIES, and a label naming the
    strategy with its resolved settings (``exhaustive``, ``sequential5``, ``retrieval-vlad10``).

    ``None`` settings take the library defaults: SEQUENTIAL_WINDOW, and for retrieval
    ``retrieval.NUM_NEIGHBORS`` and ``retrieval.default_method(feature_path)``.
    """
    check_pair_args(strategy if strategy in PAIR_STRATEGIES else "exhaustive", window,
                    num_neighbors)
    check_pairable(names)
    if strategy == "exhaustive":
        return exhaustive_pairs(names), "exhaustive"
    if strategy == "sequential":
        window = SEQUENTIAL_WINDOW if window is None else window
        return sequential_pairs(names, window, wrap), f"sequential{window}{'-wrap' * wrap}"
    if strategy == "retrieval":
        from .retrieval import NUM_NEIGHBORS, default_method, retrieval_pairs

        k = NUM_NEIGHBORS if num_neighbors is None else num_neighbors
        method = retrieval_method or default_method(feature_path)
        return (retrieval_pairs(names, k, feature_path=feature_path, image_dir=image_dir,
                                method=method), f"retrieval-{method}{k}")
    raise DiftSfmError(f"Unknown pair strategy '{strategy}'; choose one of "
                       f"{', '.join(PAIR_STRATEGIES)}.")
