"""Step 2: match the descriptors of image pairs -> matches.h5 (hloc layout)."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from .errors import FormatError
from .featurizers.base import resolve_device
from .formats.features import is_complete_features, list_names
from .formats.h5store import ShardedH5Writer, open_h5
from .formats.matches import find_pair, is_complete_matches, match_datasets, pair_key
from .matching import mutual_nearest_neighbours
from .pairs import read_pairs
from .progress import progress

logger = logging.getLogger("dift_sfm")


class _DescriptorCache:
    """Descriptors (N, D) float32 of recently used images, read from an open features file."""

    def __init__(self, f: h5py.File, path: Path, size: int = 64):
        self.f, self.path, self.size = f, path, size
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, name: str) -> np.ndarray:
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        group = self.f[name]
        if not is_complete_features(group):
            raise FormatError(f"Entry '{name}' of features file {self.path} is incomplete.")
        desc = group["descriptors"][()].T.astype(np.float32)
        self.cache[name] = desc
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return desc


def _done_pairs(match_path: Path, writer: ShardedH5Writer,
                pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Pairs already complete in the output or in the shards of an interrupted run."""
    files = [match_path] if match_path.exists() else []
    files += sorted(writer.parts.glob("*.h5")) if writer.parts.is_dir() else []
    done: set[tuple[str, str]] = set()
    for path in files:
        with open_h5(path) as f:
            done.update(p for p in pairs if find_pair(f, *p) is not None)
    return done


def match_features(
    conf: dict,
    pairs_path: Path | str,
    feature_path: Path | str,
    match_path: Path | str,
    overwrite: bool = False,
) -> Path:
    """Mutual-NN match every pair of ``pairs_path``; write/extend ``match_path``.

    Every pair line is validated against the features file before any matching (errors name
    the line). Pairs already present (either orientation) are skipped unless ``overwrite``.
    ``conf['matcher']``: metric ('cosine'|'l2'), ratio_threshold, min_score, device.
    """
    pairs_path, feature_path, match_path = Path(pairs_path), Path(feature_path), Path(match_path)
    if not feature_path.exists():
        raise FormatError(f"Features file {feature_path} does not exist: run `dift-sfm extract`.")
    pairs = read_pairs(pairs_path, known_names=list_names(feature_path))
    mconf = conf["matcher"]
    match_path.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardedH5Writer(match_path, is_complete_matches, shard_entries=256,
                             root_attrs={"conf": conf.get("name", ""),
                                         "matcher_json": json.dumps(mconf)})
    done = set() if overwrite else _done_pairs(match_path, writer, pairs)
    todo = [p for p in pairs if p not in done]
    logger.info("Matching %d pairs (%d already done) into %s.", len(todo), len(pairs) - len(todo),
                match_path)
    device = resolve_device(mconf.get("device", "auto"))
    try:
        with open_h5(feature_path) as f:
            descriptors = _DescriptorCache(f, feature_path)
            for name0, name1 in progress(todo, desc="match", unit="pair"):
                d0, d1 = descriptors(name0), descriptors(name1)
                if d0.shape[1] != d1.shape[1]:
                    raise FormatError(
                        f"Features file {feature_path} mixes descriptor sizes: '{name0}' has "
                        f"{d0.shape[1]}, '{name1}' has {d1.shape[1]}. Re-extract with one conf.")
                m0, s0 = mutual_nearest_neighbours(
                    d0, d1, metric=mconf.get("metric", "cosine"),
                    ratio_threshold=mconf.get("ratio_threshold"), min_score=mconf.get("min_score"),
                    device=device)
                writer.write(pair_key(name0, name1), match_datasets(m0, s0))
        writer.finalize()
    except BaseException:
        writer.close()
        raise
    return match_path
