"""Step 1: detect and describe keypoints of a set of images -> features.h5 (hloc layout)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import DiftSfmError, FormatError, ImageReadError, PartialFailure
from .featurizers import Featurizer, get_featurizer
from .formats.features import (
    FeaturesReader,
    feature_datasets,
    feature_settings,
    is_complete_features,
)
from .formats.h5store import ShardedH5Writer
from .formats.resume import may_resume
from .images import read_image, resize_max, resolve_image_list
from .keypoints import Keypoints, detect_keypoints, import_keypoints
from .progress import progress

logger = logging.getLogger("dift_sfm")

T = TypeVar("T")


def prefetch(items: list[str], load: Callable[[str], T],
             depth: int = 2) -> Iterator[tuple[str, Future]]:
    """Yield (item, future of load(item)) with ``depth`` loads running ahead in a thread.

    Image decoding releases the GIL, so loading overlaps with the featurizer's compute.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = [(item, pool.submit(load, item)) for item in items[:depth]]
        for i in range(len(items)):
            if i + depth < len(items):
                futures.append((items[i + depth], pool.submit(load, items[i + depth])))
            yield futures[i]
            futures[i] = (futures[i][0], None)  # type: ignore[assignment]


#: Conf sections stored in a features file: all of them, so `match` can use them as written.
STORED_SECTIONS = ("preprocessing", "keypoints", "featurizer", "matcher", "pca")


def _may_keep(source: Path, conf: dict, overwrite: bool) -> bool:
    """The resume rule applied to one features file or shard: may its entries be kept?"""
    with FeaturesReader(source) as f:
        stored = f.conf
    return may_resume(source, feature_settings(stored) if stored else None,
                      feature_settings(conf), overwrite, "features file",
                      stored.get("name") if stored else None)


def _existing_dim(features: FeaturesReader | None, done: set[str]) -> int | None:
    """Descriptor size of the entries already in the file (None if it has none)."""
    if features is None or "pca_components" in features.attrs:
        return None  # none yet, or PCA-reduced: new entries are reduced after extraction
    in_file = [n for n in features.names if n in done]
    return features.descriptors(in_file[0]).shape[1] if in_file else None


@dataclass
class Described:
    """One image's result: what a features.h5 entry holds."""

    name: str
    image_size: tuple[int, int]  # (W, H) of the original
    keypoints: Keypoints  # original pixels
    descriptors: np.ndarray  # (N, D) float32, L2-normalised


#: What an extraction backend yields, in the order of the names it was given: the result of
#: each image, or the ImageReadError that names why it could not be used.
Outcome = tuple[str, "Described | ImageReadError"]


@dataclass
class PreparedImage:
    """An image ready to describe: resized copy and keypoints in both frames."""

    name: str
    image_size: tuple[int, int]  # (W, H) of the original
    resized: np.ndarray  # (h, w, 3) float32 in [0, 1], what the featurizer sees
    keypoints: Keypoints  # original pixels
    keypoints_resized: Keypoints  # pixels of ``resized``


def prepare_image(image: np.ndarray, conf: dict, name: str | None = None) -> PreparedImage:
    """Check the size, apply ``preprocessing.resize_max`` and detect (or import) keypoints."""
    pre = conf["preprocessing"]
    kconf = conf["keypoints"]
    h, w = image.shape[:2]
    min_size = pre["min_size"]
    if min(h, w) < min_size:
        raise ImageReadError(f"Image {name or ''} is {w}x{h}, smaller than the "
                             f"{min_size} px minimum of this conf (preprocessing.min_size).")
    resized, scale = resize_max(image, pre["resize_max"])
    if kconf.get("name") == "import":
        if name is None:
            raise DiftSfmError("Imported keypoints need the image name.")
        kpts = import_keypoints(name, **{k: v for k, v in kconf.items() if k != "name"})
        kpts_r = kpts.scaled((1 / scale[0], 1 / scale[1]))
    else:
        kpts_r = detect_keypoints(resized, kconf)
        kpts = kpts_r.scaled(scale)
    return PreparedImage(name or "", (w, h), resized, kpts, kpts_r)


class LocalBackend:
    """Describes images in this process: reading runs ahead in a thread, then keypoints and the
    featurizer (batches of ``featurizer.batch_size`` images).

    ``__call__(names)`` yields one ``Outcome`` per name, in order. The featurizer is built on
    first use (a run with nothing to do never loads a model).
    """

    def __init__(self, conf: dict, image_dir: Path, featurizer: Featurizer | None = None):
        self.conf, self.image_dir, self.featurizer = conf, image_dir, featurizer

    def __call__(self, names: list[str]) -> Iterator[Outcome]:
        if not names:
            return
        featurizer = self.featurizer = self.featurizer or get_featurizer(self.conf["featurizer"])
        batch_size = max(1, int(getattr(featurizer, "batch_size", 1) or 1))
        batch: list[PreparedImage] = []
        for name, future in prefetch(names, lambda n: read_image(self.image_dir / n)):
            try:
                batch.append(prepare_image(future.result(), self.conf, name))
            except ImageReadError as err:
                yield from self._describe(batch)
                yield name, err
                continue
            if len(batch) >= batch_size:
                yield from self._describe(batch)
        yield from self._describe(batch)

    def _describe(self, batch: list[PreparedImage]) -> Iterator[Outcome]:
        if not batch:
            return
        descs = self.featurizer.describe_batch([b.resized for b in batch],
                                               [b.keypoints_resized for b in batch])
        for item, desc in zip(batch, descs, strict=True):
            yield item.name, Described(item.name, item.image_size, item.keypoints, desc)
        batch.clear()


def extract_features(
    conf: dict,
    image_dir: Path | str,
    feature_path: Path | str,
    image_list: Path | str | list[str] | None = None,
    overwrite: bool = False,
    featurizer: Featurizer | None = None,
    backend: Callable[[list[str]], Iterator[Outcome]] | None = None,
) -> Path:
    """Detect and describe every image; write/extend ``feature_path`` (hloc features.h5).

    Resumable: images already complete in the file (or in the shards of an interrupted run)
    are skipped unless ``overwrite``. Unreadable images are logged and skipped; after all
    others are written, a PartialFailure naming them is raised.

    Args:
        conf: a conf from ``dift_sfm.confs.get_conf``.
        image_dir: root of the images; names are relative POSIX paths below it.
        image_list: a file of names or a list of names (default: every image in image_dir).
        featurizer: a ready featurizer to reuse (else built from ``conf['featurizer']``).
        backend: what describes the images (default: ``LocalBackend``; the Ray backend runs
            the same steps on a cluster). Entries are written in the order it yields them.
    """
    image_dir, feature_path = Path(image_dir), Path(feature_path)
    names = resolve_image_list(image_dir, image_list)
    root_attrs = {"conf": conf.get("name", ""), "featurizer": conf["featurizer"]["name"],
                  "conf_json": json.dumps({k: conf[k] for k in STORED_SECTIONS})}
    writer = ShardedH5Writer(feature_path, is_complete_features, root_attrs)  # locks the output
    try:
        keep = all(_may_keep(source, conf, overwrite) for source in writer.sources())
        if not keep:
            writer.discard_pending()
        with FeaturesReader(feature_path) if keep and feature_path.exists() else nullcontext() \
                as existing:
            done = set() if overwrite else writer.pending_keys()
            done |= set() if overwrite or existing is None else set(existing.names)
            existing_dim = None if overwrite else _existing_dim(existing, done)
        todo = [n for n in names if n not in done]
        logger.info("Extracting %s features for %d images (%d already done) into %s.",
                    conf.get("name", ""), len(todo), len(names) - len(todo), feature_path)
        failures: dict[str, str] = {}
        as_half = conf["preprocessing"]["as_half"]
        backend = backend or LocalBackend(conf, image_dir, featurizer)
        for name, result in progress(backend(todo), total=len(todo), desc="extract", unit="img"):
            if isinstance(result, ImageReadError):
                failures[name] = str(result)
                logger.error("%s", result)
                continue
            dim = result.descriptors.shape[1]
            if existing_dim is not None and dim != existing_dim:
                raise FormatError(
                    f"Features file {feature_path} holds {existing_dim}-D descriptors but conf "
                    f"'{conf.get('name')}' gives {dim}-D ones: use another --output "
                    "or --overwrite.")
            writer.root_attrs["featurizer_dim"] = dim
            kpts = result.keypoints
            writer.write(name, feature_datasets(kpts.xy, result.descriptors, kpts.scores,
                                                result.image_size, as_half))
        writer.finalize(drop_existing=not keep)
    except BaseException:
        writer.close()  # finished images stay in shards; the next run picks them up
        raise
    dim = conf["pca"]["dim"]
    if dim:
        from .pca import reduce_features_file

        reduce_features_file(feature_path, dim)
    if failures:
        raise PartialFailure(
            f"{len(failures)} of {len(names)} images failed (the others were written to "
            f"{feature_path}): " + "; ".join(f"{n}: {e}" for n, e in failures.items()), failures)
    return feature_path
