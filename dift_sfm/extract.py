"""Step 1: detect and describe keypoints of a set of images -> features.h5 (hloc layout)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

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
from .runtime import pool_opencv_threads, set_opencv_threads
from .streams import ordered_map, run_ahead

logger = logging.getLogger("dift_sfm")

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


def default_workers() -> int:
    """Default size of the image-preparation pool: one worker per core, at most 8."""
    return min(8, os.cpu_count() or 1)


def load_prepared(image_dir: Path, name: str, conf: dict) -> PreparedImage | ImageReadError:
    """Read ``image_dir / name`` and ``prepare_image`` it; an unusable image gives its error.

    Top-level (picklable) so that a process pool can run it.
    """
    try:
        return prepare_image(read_image(image_dir / name), conf, name)
    except ImageReadError as err:
        return err


class LocalBackend:
    """Describes images on this machine, as a pipeline.

    With ``num_workers > 0``: a pool of ``num_workers`` threads (or processes) reads, resizes
    and detects keypoints of the next images (``load_prepared``), at most ``prefetch`` images
    ahead; a describe thread runs the featurizer on batches of ``featurizer.batch_size``
    prepared images, handing finished outcomes to the caller (who writes them) through a
    bounded queue, so neither preparation nor writing waits for the featurizer or each other.
    With ``num_workers=0`` every step runs one after another in the calling thread.

    Both give identical outcomes in identical order: the same functions run on the same
    inputs, and batches are formed the same way (an unreadable image ends the current batch).

    ``__call__(names)`` yields one ``Outcome`` per name, in order. The featurizer is built on
    first use (a run with nothing to do never loads a model), while the pool already prepares
    the first images.

    Args:
        conf: a complete conf (``dift_sfm.confs.get_conf``).
        image_dir: root of the images.
        featurizer: a ready featurizer to reuse (else built from ``conf['featurizer']``).
        num_workers: size of the preparation pool (None: ``default_workers()``, one per core
            up to 8; 0: no pool, no threads).
        worker_type: 'thread' (OpenCV decoding, resizing and DoG release the GIL) or
            'process' (spawned processes; for detectors that hold the GIL).
        prefetch: prepared images held ahead of the featurizer at most (None: twice the
            workers plus one batch). Bounds memory: each holds its resized float32 image.
    """

    def __init__(self, conf: dict, image_dir: Path, featurizer: Featurizer | None = None,
                 num_workers: int | None = None, worker_type: str = "thread",
                 prefetch: int | None = None):
        if worker_type not in ("thread", "process"):
            raise DiftSfmError(f"Unknown worker type '{worker_type}': use 'thread' or 'process'.")
        self.conf, self.image_dir, self.featurizer = conf, Path(image_dir), featurizer
        self.num_workers = default_workers() if num_workers is None else max(0, int(num_workers))
        self.worker_type = worker_type
        self.prefetch = prefetch

    def _batch_size(self) -> int:
        return max(1, int(getattr(self.featurizer, "batch_size", 1) or 1))

    def _featurizer(self) -> Featurizer:
        if self.featurizer is None:
            self.featurizer = get_featurizer(self.conf["featurizer"])
        return self.featurizer

    def __call__(self, names: list[str]) -> Iterator[Outcome]:
        if not names:
            return
        if self.num_workers == 0:
            self._featurizer()
            prepared = ((n, load_prepared(self.image_dir, n, self.conf)) for n in names)
            yield from self._describe_stream(prepared)
            return
        yield from self._pipelined(names)

    def _pipelined(self, names: list[str]) -> Iterator[Outcome]:
        cv_threads = pool_opencv_threads(self.num_workers)  # the pool is the parallelism
        restore_cv = None
        if self.worker_type == "process":
            pool: Executor = ProcessPoolExecutor(
                self.num_workers, mp_context=mp.get_context("spawn"),
                initializer=None if cv_threads is None else set_opencv_threads,
                initargs=() if cv_threads is None else (cv_threads,))
        else:
            pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="dift-sfm-prepare")
            if cv_threads is not None:  # OpenCV's thread count is process-wide
                restore_cv = set_opencv_threads(cv_threads)
        try:
            batch_size = max(1, int(self.conf["featurizer"].get("batch_size") or 1))
            depth = self.prefetch or 2 * self.num_workers + batch_size
            load = partial(load_prepared, self.image_dir, conf=self.conf)
            prepared = zip(names, ordered_map(load, names, pool, depth), strict=True)
            self._featurizer()  # the pool prepares the first images meanwhile
            # outcomes are small (keypoints, descriptors): a few batches of slack for writing
            yield from run_ahead(self._describe_stream(prepared), 2 * self._batch_size() + 2,
                                 "dift-sfm-describe")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if restore_cv is not None:
                set_opencv_threads(restore_cv)

    def _describe_stream(
            self, prepared: Iterable[tuple[str, PreparedImage | ImageReadError]]
    ) -> Iterator[Outcome]:
        """Outcomes of prepared images, in order; the featurizer sees batches of them."""
        batch_size = self._batch_size()
        batch: list[PreparedImage] = []
        for name, item in prepared:
            if isinstance(item, ImageReadError):
                yield from self._describe(batch)
                yield name, item
                continue
            batch.append(item)
            if len(batch) >= batch_size:
                yield from self._describe(batch)
        yield from self._describe(batch)

    def _describe(self, batch: list[PreparedImage]) -> Iterator[Outcome]:
        if not batch:
            return
        descs = self._featurizer().describe_batch([b.resized for b in batch],
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
        pre = conf["preprocessing"]
        backend = backend or LocalBackend(conf, image_dir, featurizer, pre["num_workers"],
                                          pre["worker_type"])
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
