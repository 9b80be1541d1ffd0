"""Step 2: match the descriptors of image pairs -> matches.h5 (hloc layout)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .confs import get_conf, resolve_conf
from .errors import FormatError
from .formats.features import FeaturesReader, feature_settings
from .formats.h5store import ShardedH5Writer, build_piece
from .formats.matches import (
    MatchesReader,
    check_pair_keys,
    is_complete_matches,
    match_attrs,
    match_datasets,
    pair_key,
)
from .formats.resume import StaleOutputError, follow_stored, may_resume, settings_diff
from .matchers import get_matcher
from .pairs import read_pairs
from .planning import ByteBudgetCache, locality_order, pair_batches, stream_tile
from .progress import progress
from .streams import run_ahead

logger = logging.getLogger("dift_sfm")


#: What a matching backend yields, in any order (each entry is written under its pair key).
#: A backend that declares ``packs_pieces = True`` is called as
#: ``backend(pairs, features, root_attrs=...)`` and may yield ``PackedPairs`` instead.
PairMatches = tuple[tuple[str, str], np.ndarray, np.ndarray]  # pair, matches0, scores0


def match_entry(pair: tuple[str, str], matches0: np.ndarray, scores0: np.ndarray,
                fingerprint0: str, fingerprint1: str) -> tuple[str, dict, dict]:
    """(key, datasets, attributes) of one pair's matches.h5 entry: the one rule for the
    driver's writes and the pieces workers pack."""
    return (pair_key(*pair), match_datasets(matches0, scores0),
            match_attrs(fingerprint0, fingerprint1))


@dataclass
class PackedPairs:
    """Matched pairs already packed by a worker into a piece (a closed shard's bytes,
    ``formats.h5store.build_piece``): the driver stores it as it is
    (``ShardedH5Writer.add_piece``), with no HDF5 work per pair."""

    pairs: list[tuple[str, str]]
    piece: bytes


def pack_matches(pairs: list[tuple[str, str]], results: Iterable[tuple[np.ndarray, np.ndarray]],
                 fingerprints: Mapping[str, str], root_attrs: dict) -> PackedPairs:
    """Pack the results of ``pairs`` ((matches0, scores0) each, in order) into a piece whose
    entries record ``fingerprints`` (``FeaturesReader.fingerprint`` of each image)."""
    entries = (match_entry(pair, m0, s0, fingerprints[pair[0]], fingerprints[pair[1]])
               for pair, (m0, s0) in zip(pairs, results, strict=True))
    return PackedPairs(list(pairs), build_piece(entries, root_attrs))


class _Resident:
    """One image's descriptors in the cache: read by the reader thread, prepared (moved to the
    device, normalised) on first use by the thread that matches.

    Preparing there keeps torch's CPU work in one thread: a second thread running torch ops
    starts a second OpenMP team, and on a CPU the two teams' spinning workers slowed each
    matching op ~2x. ``nbytes`` is the prepared size (float32) when there is a ``prepare``,
    so the cache budget counts what stays resident.
    """

    __slots__ = ("_value", "_prepare", "shape", "nbytes")

    def __init__(self, descriptors: np.ndarray, prepare: Callable[[np.ndarray], Any] | None):
        self._value: Any = descriptors
        self._prepare = prepare
        self.shape = descriptors.shape
        self.nbytes = int(descriptors.size * 4 if prepare is not None else descriptors.nbytes)

    def value(self) -> Any:
        """The descriptors as the matcher takes them (prepared once, then kept)."""
        if self._prepare is not None:
            self._value, self._prepare = self._prepare(self._value), None
        return self._value


class LocalBackend:
    """Matches pairs on this machine with the conf's matcher, many pairs per device call.

    Three stages overlap: a reader thread reads the descriptors of the next pairs from the
    features file (kept resident within a budget of bytes, ``planning.ByteBudgetCache``); a
    matcher thread moves them to the matcher's device on first use (normalised:
    ``Matcher.prepare``, once per cached image) and matches ``matcher.pair_batch`` consecutive
    pairs per batched product (``planning.pair_batches``, ``Matcher.match_prepared``); the
    caller writes the results meanwhile. On a CPU the matching runs in the caller's thread
    instead: torch's CPU ops run ~2x slower in a second thread once the first has used them
    (two OpenMP teams on the same cores, measured in docs/benchmarks.md), and writing a pair
    costs well under 1% of matching it there.

    The budget is ``cache_bytes``, else the matcher's ``cache_mb`` (``Matcher.cache_bytes``),
    and never less than one batch of pairs needs. When the descriptors of every image of the
    run fit, each image is read once and the pairs keep their order; otherwise they are
    processed in ``planning.locality_order`` (capacity estimated from the first image read), so
    that the reads grow with N^2 / capacity instead of the number of pairs.

    ``__call__(pairs, features)`` yields ``(pair, matches0 (N0,), scores0 (N0,))`` in that
    processing order. ``stats`` then holds ``reads`` (descriptor reads), ``budget_bytes``,
    ``capacity`` (images estimated to fit) and ``reordered``.
    """

    def __init__(self, matcher_conf: dict, cache_bytes: int | None = None):
        self.matcher = get_matcher(matcher_conf)
        self.cache_bytes = cache_bytes
        self.stats: dict[str, int] = {}

    def __call__(self, pairs: list[tuple[str, str]],
                 features: FeaturesReader) -> Iterator[PairMatches]:
        if not pairs:
            return
        batch = self.matcher.pair_batch
        ahead = max(1, int(self.matcher.conf.get("prefetch") or 1) // batch)
        loaded = run_ahead(self._load(pairs, features, batch), ahead, "dift-sfm-read")
        matched = self._match(loaded)
        if self.matcher.device.type != "cpu":
            # a device: launching the next batch overlaps the caller's writing
            matched = run_ahead(matched, 2, "dift-sfm-match")
        for results in matched:
            yield from results  # one hand-over per batch, not per pair

    def budget(self) -> int:
        """The cache budget in bytes before the one-batch floor (measured now for 'auto')."""
        if self.cache_bytes is not None:
            return int(self.cache_bytes)
        return self.matcher.cache_bytes()

    def _load(self, pairs: list[tuple[str, str]], features: FeaturesReader,
              batch: int) -> Iterator[tuple[list[tuple[str, str]], list, list]]:
        """Batches of (pairs, desc0 holders, desc1 holders) (``_Resident``: read here,
        prepared for the matcher by the thread that matches)."""
        prepare = self.matcher.prepare

        def load(name: str) -> _Resident:
            return _Resident(features.descriptors(name), prepare)

        budget = self.budget()
        cache: ByteBudgetCache[_Resident] = ByteBudgetCache(load, budget)
        images = list(dict.fromkeys(n for pair in pairs for n in pair))
        per_image = 0
        for name in images[:8]:  # size of one image: the first with any descriptor
            per_image = cache.get(name).nbytes
            if per_image:
                break
        cache.budget = max(budget, 2 * batch * per_image)
        capacity = cache.budget // per_image if per_image else len(images)
        order = locality_order(pairs, capacity)
        self.stats = {"budget_bytes": cache.budget, "capacity": min(capacity, len(images)),
                      "reordered": int(order != pairs), "reads": 0}
        logger.info("Descriptor cache limit: %.1f MiB (room for about %d of the %d images, "
                    "%.3g MiB each)%s.",
                    cache.budget / 2**20, min(capacity, len(images)), len(images),
                    per_image / 2**20,
                    "" if capacity >= len(images) else
                    f"; pairs reordered in tiles of {stream_tile(capacity)} images")
        try:
            for chunk in pair_batches(order, batch):
                names = list(dict.fromkeys(n for pair in chunk for n in pair))
                cache.touch(names)
                keep = set(names)
                d0s, d1s = [], []
                for name0, name1 in chunk:
                    d0, d1 = cache.get(name0, keep), cache.get(name1, keep)
                    check_same_dim(features, name0, d0, name1, d1)
                    d0s.append(d0)
                    d1s.append(d1)
                yield chunk, d0s, d1s
        finally:
            self.stats["reads"] = cache.reads
            logger.debug("Read descriptors %d times for %d images, %d pairs.", cache.reads,
                         len(images), len(pairs))

    def _match(self, loaded: Iterator[tuple[list[tuple[str, str]], list, list]]
               ) -> Iterator[list[PairMatches]]:
        """The results of each batch, as one list."""
        for chunk, h0s, h1s in loaded:
            results = self.matcher.match_prepared([h.value() for h in h0s],
                                                  [h.value() for h in h1s])
            yield [(pair, m0, s0) for pair, (m0, s0) in zip(chunk, results, strict=True)]


def check_same_dim(features: FeaturesReader, name0: str, d0: np.ndarray, name1: str,
                   d1: np.ndarray) -> None:
    """Refuse to match descriptors of different sizes (a file mixing two confs)."""
    if d0.shape[-1] != d1.shape[-1]:
        raise FormatError(
            f"Features file {features.path} mixes descriptor sizes: '{name0}' has "
            f"{d0.shape[-1]}, '{name1}' has {d1.shape[-1]}. Re-extract with one conf.")


def conf_for_matching(feature_path: Path | str, name: str | None = None,
                      overrides: Mapping[str, Any] | None = None) -> dict:
    """The conf ``match`` uses for a features file: the one stored in it by ``extract`` (every
    section as written, overrides included), or the named conf, with ``overrides`` applied.

    Only ``matcher.*`` may be overridden; a named conf whose features settings differ from
    the file's is refused (its descriptors were not made that way).
    """
    overrides = dict(overrides or {})
    bad = [k for k in overrides if not k.startswith("matcher.")]
    if bad:
        raise FormatError(f"`match` only takes matcher settings; '{bad[0]}' belongs to "
                          "`extract` (re-extract with it into another features file).")
    with FeaturesReader(feature_path) as f:
        stored = f.conf
    if name is None:
        if stored is None:  # e.g. written by hloc: plain mutual NN on cosine similarity
            logger.info("Features file %s records no conf: matching with plain MNN.",
                        feature_path)
            return resolve_conf({"name": "foreign"}, overrides)
        return resolve_conf({k: v for k, v in stored.items() if k != "output"}, overrides)
    conf = get_conf(name, overrides)
    if stored is not None:  # how the file stores descriptors (float16 or not) is its own
        conf = follow_stored(stored, conf, feature_path, "features file", log=False)
        diff = settings_diff(feature_settings(stored), feature_settings(conf))
        if diff:
            raise FormatError(
                f"--conf {name} does not fit features file {feature_path}, written by conf "
                f"'{stored.get('name')}' ({'; '.join(diff[:4])}). Leave out --conf to use the "
                "file's own settings (--set matcher.KEY=VALUE still applies).")
    return conf


def _stale_pairs(writer: ShardedH5Writer, pairs: list[tuple[str, str]],
                 features: FeaturesReader) -> tuple[set[tuple[str, str]], list[tuple[str, str]]]:
    """(pairs complete in the output or in shards whose features still fit, pairs that are
    stored but were computed from other features, or record none)."""
    done: set[tuple[str, str]] = set()
    stale: list[tuple[str, str]] = []
    for source in writer.sources():
        with MatchesReader(source) as f:
            for pair in pairs:
                if pair in done or not f.has(*pair):
                    continue
                if f.provenance(*pair) == (features.fingerprint(pair[0]),
                                           features.fingerprint(pair[1])):
                    done.add(pair)
                else:
                    stale.append(pair)
    return done, [p for p in dict.fromkeys(stale) if p not in done]


def match_features(
    conf: dict,
    pairs_path: Path | str,
    feature_path: Path | str,
    match_path: Path | str,
    overwrite: bool = False,
    backend: Callable[[list[tuple[str, str]], FeaturesReader], Iterator[PairMatches]]
    | None = None,
) -> Path:
    """Match every pair of ``pairs_path`` with ``conf['matcher']``; write/extend ``match_path``.

    Every pair line is validated against the features file before any matching (errors name
    the line). Each stored pair records the fingerprints of the features it came from; pairs
    already present and still fitting are skipped unless ``overwrite``. A matches file computed
    with other matcher settings, or holding pairs of other features, is refused (StaleOutputError)
    unless ``overwrite``. ``backend`` computes the matches (default: ``LocalBackend``; the Ray
    backend runs them on a cluster), in any order: each entry is written under its pair key.
    """
    pairs_path, feature_path, match_path = Path(pairs_path), Path(feature_path), Path(match_path)
    if not feature_path.exists():
        raise FormatError(f"Features file {feature_path} does not exist: run `dift-sfm extract`.")
    features = FeaturesReader(feature_path)
    try:
        return _match(conf, pairs_path, features, match_path, overwrite, backend)
    finally:
        features.close()


def _match(conf: dict, pairs_path: Path, features: FeaturesReader, match_path: Path,
           overwrite: bool, backend) -> Path:
    pairs = read_pairs(pairs_path, known_names=features.names)
    if not pairs:
        raise FormatError(f"Pairs file {pairs_path} holds no pairs: nothing to match. Write "
                          "one 'name0 name1' per line (e.g. `dift-sfm pairs exhaustive`).")
    check_pair_keys(pairs, f"pairs file {pairs_path}")
    mconf = conf["matcher"]
    logger.info("Matching with %s", json.dumps(mconf))
    writer = ShardedH5Writer(match_path, is_complete_matches, shard_entries=4096,
                             root_attrs={"conf": conf.get("name", ""),
                                         "matcher_json": json.dumps(mconf)})
    try:
        keep = True
        for source in writer.sources():
            with MatchesReader(source) as f:
                stored = f.attrs.get("matcher_json")
            keep = keep and may_resume(source, None if stored is None else json.loads(stored),
                                       mconf, overwrite, "matches file")
        if not keep:
            writer.discard_pending()
        done, stale = (set(), []) if overwrite or not keep else _stale_pairs(writer, pairs,
                                                                               features)
        if stale:
            n0, n1 = stale[0]
            raise StaleOutputError(
                f"Matches file {match_path} holds {len(stale)} of these pairs computed from "
                f"other features than {features.path} (or recording none), e.g. '{n0} {n1}'. "
                "Use --overwrite to recompute them, or write to another output.")
        todo = [p for p in pairs if p not in done]
        logger.info("Matching %d pairs (%d already done) into %s.", len(todo),
                    len(pairs) - len(todo), match_path)
        backend = backend or LocalBackend(mconf)
        if getattr(backend, "packs_pieces", False):
            outcomes = backend(todo, features, root_attrs=dict(writer.root_attrs))
        else:
            outcomes = backend(todo, features)
        # the driver's write loop: whatever backend computed them, pairs are stored here only
        with progress(None, total=len(todo), desc="match", unit="pair") as bar:
            for outcome in outcomes:
                if isinstance(outcome, PackedPairs):  # a worker's finished block, as it is
                    writer.add_piece(outcome.piece, [pair_key(*p) for p in outcome.pairs])
                    bar.update(len(outcome.pairs))
                    continue
                pair, m0, s0 = outcome
                writer.write(*match_entry(pair, m0, s0, features.fingerprint(pair[0]),
                                          features.fingerprint(pair[1])))
                bar.update()
        writer.finalize(drop_existing=not keep)
    except BaseException:
        writer.close()
        raise
    return match_path
