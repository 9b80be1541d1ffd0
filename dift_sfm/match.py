"""Step 2: match the descriptors of image pairs -> matches.h5 (hloc layout)."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .confs import get_conf, resolve_conf
from .errors import FormatError
from .formats.features import FeaturesReader, feature_settings
from .formats.h5store import ShardedH5Writer
from .formats.matches import (
    MatchesReader,
    check_pair_keys,
    is_complete_matches,
    match_attrs,
    match_datasets,
    pair_key,
)
from .formats.resume import StaleOutputError, may_resume, settings_diff
from .matchers import get_matcher
from .pairs import read_pairs
from .progress import progress
from .streams import run_ahead

logger = logging.getLogger("dift_sfm")


#: What a matching backend yields, in the order of the pairs it was given.
PairMatches = tuple[tuple[str, str], np.ndarray, np.ndarray]  # pair, matches0, scores0


class LocalBackend:
    """Matches pairs on this machine with the conf's matcher, many pairs per device call.

    Three stages overlap: a reader thread reads the descriptors of the next pairs from the
    features file and moves them to the matcher's device (normalised, kept resident for the
    ``cache_size`` images used last); a matcher thread matches ``matcher.pair_batch``
    consecutive pairs per batched product (``MNN.match_prepared``); the caller writes the
    results meanwhile. Pairs keep their order.

    ``__call__(pairs, features)`` yields ``(pair, matches0 (N0,), scores0 (N0,))`` in order.
    """

    def __init__(self, matcher_conf: dict, cache_size: int = 64):
        self.matcher = get_matcher(matcher_conf)
        self.cache_size = cache_size

    def __call__(self, pairs: list[tuple[str, str]],
                 features: FeaturesReader) -> Iterator[PairMatches]:
        if not pairs:
            return
        batch = getattr(self.matcher, "pair_batch", 1)
        ahead = max(1, int(self.matcher.conf.get("prefetch") or 1) // batch)
        loaded = run_ahead(self._load(pairs, features, batch), ahead, "dift-sfm-read")
        for results in run_ahead(self._match(loaded), 2, "dift-sfm-match"):
            yield from results  # one hand-over per batch, not per pair

    def _load(self, pairs: list[tuple[str, str]], features: FeaturesReader,
              batch: int) -> Iterator[tuple[list[tuple[str, str]], list, list]]:
        """Batches of (pairs, desc0 tensors, desc1 tensors), descriptors on the device."""
        prepare = getattr(self.matcher, "prepare", None)
        cache: OrderedDict[str, Any] = OrderedDict()

        def descriptors(name: str):
            if name not in cache:
                d = features.descriptors(name)
                cache[name] = prepare(d) if prepare is not None else d
                if len(cache) > self.cache_size:
                    cache.popitem(last=False)
            cache.move_to_end(name)
            return cache[name]

        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            d0s, d1s = [], []
            for name0, name1 in chunk:
                d0, d1 = descriptors(name0), descriptors(name1)
                check_same_dim(features, name0, d0, name1, d1)
                d0s.append(d0)
                d1s.append(d1)
            yield chunk, d0s, d1s

    def _match(self, loaded: Iterator[tuple[list[tuple[str, str]], list, list]]
               ) -> Iterator[list[PairMatches]]:
        """The results of each batch, as one list."""
        match_prepared = getattr(self.matcher, "match_prepared", None)
        for chunk, d0s, d1s in loaded:
            if match_prepared is not None:
                results = match_prepared(d0s, d1s)
            else:
                results = [self.matcher(d0, d1) for d0, d1 in zip(d0s, d1s, strict=True)]
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
    if stored is not None:
        diff = settings_diff(feature_settings(stored), feature_settings(conf))
        if diff:
            raise FormatError(
                f"--conf {name} does not fit features file {feature_path}, written by conf "
                f"'{stored.get('name')}' ({'; '.join(diff[:4])}). Leave out --conf to use the "
                "file's own settings (--set matcher.KEY=VALUE still applies).")
    return conf


def _stale_pairs(writer: ShardedH5Writer, pairs: list[tuple[str, str]],
                 fingerprint) -> tuple[set[tuple[str, str]], list[tuple[str, str]]]:
    """(pairs complete in the output or in shards whose features still fit, pairs that are
    stored but were computed from other features, or record none)."""
    done: set[tuple[str, str]] = set()
    stale: list[tuple[str, str]] = []
    for source in writer.sources():
        with MatchesReader(source) as f:
            for pair in pairs:
                if pair in done or not f.has(*pair):
                    continue
                if f.provenance(*pair) == (fingerprint(pair[0]), fingerprint(pair[1])):
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
    backend runs them on a cluster); entries are written in the order it yields them.
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
    fingerprints: dict[str, str] = {}

    def fingerprint(name: str) -> str:
        if name not in fingerprints:
            fingerprints[name] = features.fingerprint(name)
        return fingerprints[name]

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
                                                                               fingerprint)
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
        for (name0, name1), m0, s0 in progress(backend(todo, features), total=len(todo),
                                               desc="match", unit="pair"):
            writer.write(pair_key(name0, name1), match_datasets(m0, s0),
                         match_attrs(fingerprint(name0), fingerprint(name1)))
        writer.finalize(drop_existing=not keep)
    except BaseException:
        writer.close()
        raise
    return match_path
