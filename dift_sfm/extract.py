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
from .featurizers import DenseFeaturizer, Featurizer, featurizer_class, get_featurizer
from .featurizers.base import input_size
from .formats.features import (
    FeaturesReader,
    feature_datasets,
    feature_settings,
    is_complete_features,
)
from .formats.h5store import ShardedH5Writer, build_piece
from .formats.resume import CONF_SECTIONS, follow_stored, may_resume
from .images import (
    MAX_PIXELS,
    ImageHeader,
    decode_image,
    jpeg_reduction,
    read_header,
    read_image_bytes,
    resize_image,
    resized_size,
    resolve_image_list,
)
from .keypoints import Keypoints, detect_keypoints, top_k
from .planning import featurizer_batch_size, image_batches
from .progress import progress
from .runtime import pool_opencv_threads, set_opencv_threads
from .streams import ordered_map, run_ahead

logger = logging.getLogger("dift_sfm")



def _stored_confs(sources: list[Path]) -> dict[Path, dict | None]:
    """The conf stored in each features file or shard of an output (one read each)."""
    confs = {}
    for source in sources:
        with FeaturesReader(source) as f:
            confs[source] = f.conf
    return confs


def _may_keep(source: Path, stored: dict | None, conf: dict, overwrite: bool) -> bool:
    """The resume rule applied to one features file or shard: may its entries be kept?"""
    return may_resume(source, feature_settings(stored) if stored else None,
                      feature_settings(conf), overwrite, "features file",
                      stored.get("name") if stored else None)


def _existing_dim(features: FeaturesReader | None, done: set[str]) -> int | None:
    """Descriptor size of the entries already in the file (None if it has none)."""
    if features is None or "pca_components" in features.attrs:
        return None  # none yet, or PCA-reduced: new entries are reduced after extraction
    first = next((n for n in sorted(done) if n in features), None)  # no listing of the file
    return features.descriptors(first).shape[1] if first is not None else None


@dataclass
class Described:
    """One image's result: what a features.h5 entry holds."""

    name: str
    image_size: tuple[int, int]  # (W, H) of the original
    keypoints: Keypoints  # original pixels
    descriptors: np.ndarray  # (N, D) float32, L2-normalised


def feature_entry(result: Described, as_half: bool) -> dict[str, np.ndarray]:
    """The datasets of ``result``'s features.h5 entry (the one rule for the driver's writes and
    the pieces workers pack)."""
    kpts = result.keypoints
    return feature_datasets(kpts.xy, result.descriptors, kpts.scores, result.image_size,
                            as_half)


@dataclass(frozen=True)
class Storage:
    """How the driver stores entries, decided once it has read what the output holds: a
    backend that runs elsewhere packs its results with it (``pack_described``), so that a piece
    holds exactly what the driver's ``write`` of each entry would."""

    as_half: bool  # descriptors stored as float16
    root_attrs: dict  # the output's root attributes (conf), carried by each piece


@dataclass
class Packed:
    """Described images already packed by a worker into a piece (a closed shard's bytes,
    ``formats.h5store.build_piece``): the driver stores it as it is
    (``ShardedH5Writer.add_piece``), with no HDF5 work per entry."""

    names: list[str]  # in the order of the names the backend was given
    dim: int  # descriptor size
    piece: bytes


def pack_described(results: list[Described], storage: Storage) -> Packed:
    """Pack one batch's results (same featurizer, so one descriptor size) into a piece."""
    dim = int(results[0].descriptors.shape[1])
    entries = ((r.name, feature_entry(r, storage.as_half), None) for r in results)
    piece = build_piece(entries, {**storage.root_attrs, "featurizer_dim": dim})
    return Packed([r.name for r in results], dim, piece)


#: What an extraction backend yields, in the order of the names it was given: the result of
#: each image, or the ImageReadError that names why it could not be used. A backend that
#: declares ``packs_pieces = True`` is called as ``backend(names, storage=Storage)`` and may
#: yield ``Packed`` batches instead of single results.
Outcome = tuple[str, "Described | ImageReadError"]


@dataclass
class PreparedImage:
    """An image ready to describe: resized copy and keypoints in both frames."""

    name: str
    image_size: tuple[int, int]  # (W, H) of the original
    resized: np.ndarray  # (h, w, 3) float32 in [0, 1], what the featurizer sees
    keypoints: Keypoints  # original pixels
    keypoints_resized: Keypoints  # pixels of ``resized``


def import_keypoints(name: str, path: str | Path | None = None,
                     max_keypoints: int | None = None) -> Keypoints:
    """``keypoints.name='import'``: the keypoints of image ``name`` in an existing hloc
    features file (e.g. SuperPoint's), in ORIGINAL image pixels; scores when it has them
    (else all 1), the ``max_keypoints`` strongest kept (``keypoints.top_k``)."""
    if path is None:
        raise DiftSfmError("keypoints.name='import' needs keypoints.path (an hloc features.h5).")
    with FeaturesReader(path) as features:
        xy = features.keypoints(name)
        try:
            scores = features.scores(name)
        except DiftSfmError:
            scores = np.ones(len(xy), np.float32)
    return top_k(Keypoints(xy, scores), max_keypoints)


#: Peak bytes per pixel of OpenCV's DoG (SIFT detector, which doubles the image first) on an
#: image of that many pixels: 226-235 B/px measured at 1.9 and 12 MP (docs/benchmarks.md).
DOG_BYTES_PER_PIXEL = 240


@dataclass(frozen=True)
class PreparePlan:
    """How one image is prepared, decided from its header before it is decoded.

    Sizes are (W, H). Scales follow ``geometry.scale_pixel_coords`` (new / original size).
    """

    original: tuple[int, int]
    reduce: int  # JPEG decode reduction (1: full size)
    decoded: tuple[int, int]
    described: tuple[int, int]  # what the featurizer sees (after resize_max)
    detected: tuple[int, int]  # what the detector sees (after detect_max; 0x0: imported)
    peak_bytes: int  # estimated peak memory of the preparation

    def summary(self) -> str:
        return (f"{self.original[0]}x{self.original[1]}, decoded at 1/{self.reduce}, "
                f"described at {self.described[0]}x{self.described[1]}, detected at "
                f"{self.detected[0]}x{self.detected[1]}")


def featurizer_needs(featurizer_conf: dict, size: tuple[int, int]) -> tuple[int, int] | None:
    """The smallest (W, H) of an image of ``size`` that loses nothing the featurizer uses: a
    dense featurizer's network input (``featurizer.img_size``, sides not rounded to the
    model's multiple); None for a featurizer that reads the image as given (sift)."""
    if not issubclass(featurizer_class(featurizer_conf.get("name")), DenseFeaturizer):
        return None
    return input_size(featurizer_conf.get("img_size"), size, 1)


def plan_preparation(header: ImageHeader, conf: dict) -> PreparePlan:
    """The sizes ``prepare`` works at for an image with ``header`` under ``conf``.

    The described image is the original with ``resize_max`` applied; the detected one that
    with ``detect_max`` applied. With ``reduced_decode`` a JPEG is decoded at the largest
    reduction that is still at least both and the featurizer's input, and resized from there.
    """
    pre = conf["preprocessing"]
    size = header.size
    detector = conf["keypoints"].get("name")

    def sizes(source: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(described, detected) sizes of an image decoded at ``source``."""
        described = resized_size(source, pre["resize_max"])
        return described, (0, 0) if detector == "import" else resized_size(
            described, pre.get("detect_max"))

    described, detected = sizes(size)
    reduce = 1
    if pre.get("reduced_decode"):
        dense = featurizer_needs(conf["featurizer"], size)
        need_describe = described if dense is None else (min(described[0], dense[0]),
                                                         min(described[1], dense[1]))
        need = (max(need_describe[0], detected[0]), max(need_describe[1], detected[1]))
        reduce = jpeg_reduction(header, need)
    decoded = (-(-size[0] // reduce), -(-size[1] // reduce))
    if reduce > 1:
        described, detected = sizes(decoded)
    # decoded samples, RGB uint8 copy and its float32 image; the resized copies; the
    # detector's float and grey images and its own scale space
    px = decoded[0] * decoded[1]
    channels = 3 if reduce > 1 else max(3, header.channels)
    peak = px * channels * header.sample_bytes * 2 + px * 12
    if described != decoded:
        peak += described[0] * described[1] * 12
    det = detected[0] * detected[1]
    peak += det * (12 + 5 + DOG_BYTES_PER_PIXEL) if detector in ("dog", "sift") else det * 24
    return PreparePlan(size, reduce, decoded, described, detected, int(peak))


def _check_min_size(size: tuple[int, int], conf: dict, name: str | None) -> None:
    min_size = conf["preprocessing"]["min_size"]
    if min(size) < min_size:
        raise ImageReadError(f"Image {name or ''} is {size[0]}x{size[1]}, smaller than the "
                             f"{min_size} px minimum of this conf (preprocessing.min_size).")


def check_budget(plan: PreparePlan, conf: dict, name: str) -> None:
    """ImageReadError naming the image when its preparation would exceed the memory budget
    (``preprocessing.memory_mb``) or the pixel limit, before anything is decoded."""
    w, h = plan.original
    budget = conf["preprocessing"].get("memory_mb")
    if plan.decoded[0] * plan.decoded[1] > MAX_PIXELS:
        raise ImageReadError(f"Image {name} is too large ({w}x{h}, {w * h / 1e6:.0f} MP; "
                             f"limit {MAX_PIXELS / 1e6:.0f} MP decoded).")
    if budget is not None and plan.peak_bytes > budget * 2**20:
        raise ImageReadError(
            f"Image {name} ({w}x{h}, {w * h / 1e6:.0f} MP) needs ~{plan.peak_bytes / 2**20:.0f} "
            f"MiB to prepare ({plan.summary()}), over preprocessing.memory_mb={budget}: raise "
            "it, or bound the image with preprocessing.resize_max / detect_max "
            "(reduced_decode=true for JPEGs).")


def prepare_image(image: np.ndarray, conf: dict, name: str | None = None,
                  original: tuple[int, int] | None = None, reduce: int = 1) -> PreparedImage:
    """Check the size, resize (``resize_max``, then ``detect_max`` for the detector) and
    detect (or import) keypoints of a decoded image (H, W, 3) float32.

    ``reduce`` > 1: ``image`` is a JPEG of size ``original`` (W, H) decoded at 1/``reduce``
    (its pixel i covers original pixels [reduce * i, reduce * (i + 1)): points map with scale
    1 / reduce).
    """
    pre = conf["preprocessing"]
    kconf = conf["keypoints"]
    h, w = image.shape[:2]
    ow, oh = original if reduce > 1 and original else (w, h)
    _check_min_size((ow, oh), conf, name)
    resized, s_desc = resize_image(image, pre["resize_max"])
    s_desc = (s_desc[0] / reduce, s_desc[1] / reduce)  # original -> described
    if kconf.get("name") == "import":
        if name is None:
            raise DiftSfmError("Imported keypoints need the image name.")
        kpts = import_keypoints(name, **{k: v for k, v in kconf.items() if k != "name"})
        kpts_r = kpts.scaled(s_desc)
    else:
        detected, s_det = resize_image(resized, pre.get("detect_max"))
        kpts_d = detect_keypoints(detected, kconf)
        del detected
        kpts_r = kpts_d.scaled((1 / s_det[0], 1 / s_det[1]))
        kpts = kpts_d.scaled((1 / (s_det[0] * s_desc[0]), 1 / (s_det[1] * s_desc[1])))
    return PreparedImage(name or "", (ow, oh), resized, kpts, kpts_r)


def prepare(source: Path | bytes, conf: dict, name: str, path: Path | str | None = None
            ) -> PreparedImage:
    """Read (a path) or take (bytes) an image file and prepare it: the header gives its size,
    the plan (``plan_preparation``) its decode reduction, and an image over the memory
    budget is refused before it is decoded. ``path`` names it in errors (default: source)."""
    path = path or source
    data = read_image_bytes(Path(source)) if isinstance(source, (str, Path)) else source
    header = read_header(data)
    reduce = 1
    if header is not None:
        _check_min_size(header.size, conf, name)
        plan = plan_preparation(header, conf)
        check_budget(plan, conf, str(path))
        reduce = plan.reduce
    image = decode_image(data, path, reduce)
    del data
    return prepare_image(image, conf, name, header.size if header else None, reduce)


def default_workers() -> int:
    """Default size of the image-preparation pool: one worker per core, at most 8."""
    return min(8, os.cpu_count() or 1)


def load_prepared(image_dir: Path, name: str, conf: dict) -> PreparedImage | ImageReadError:
    """Read ``image_dir / name`` and ``prepare_image`` it; an unusable image gives its error.

    Top-level (picklable) so that a process pool can run it.
    """
    try:
        return prepare(image_dir / name, conf, name)
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
        """Images per featurizer call: the featurizer's (given or built from the conf, by the
        rule of ``planning.featurizer_batch_size``)."""
        if self.featurizer is not None:
            return self.featurizer.batch_size
        return featurizer_batch_size(self.conf["featurizer"])

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
            depth = self.prefetch or 2 * self.num_workers + self._batch_size()
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
        """Outcomes of prepared images, in order; the featurizer sees the batches of
        ``planning.image_batches`` (an unreadable image ends the batch being built)."""
        for unit in image_batches(prepared, self._batch_size(),
                                  failed=lambda item: isinstance(item, ImageReadError)):
            if unit.failed:
                yield from unit.items
            else:
                yield from self._describe([item for _, item in unit.items])

    def _describe(self, batch: list[PreparedImage]) -> Iterator[Outcome]:
        descs = self._featurizer().describe_batch([b.resized for b in batch],
                                                  [b.keypoints_resized for b in batch])
        for item, desc in zip(batch, descs, strict=True):
            yield item.name, Described(item.name, item.image_size, item.keypoints, desc)


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
                  "conf_json": json.dumps({k: conf[k] for k in CONF_SECTIONS})}
    writer = ShardedH5Writer(feature_path, is_complete_features, root_attrs)  # locks the output
    try:
        stored = _stored_confs(writer.sources())
        if not overwrite:  # an existing output keeps its own storage settings
            for source, stored_conf in stored.items():
                conf = follow_stored(stored_conf, conf, source, "features file")
            writer.root_attrs["conf_json"] = json.dumps({k: conf[k] for k in CONF_SECTIONS})
        keep = all(_may_keep(source, stored_conf, conf, overwrite)
                   for source, stored_conf in stored.items())
        if not keep:
            writer.discard_pending()
        with FeaturesReader(feature_path) if keep and feature_path.exists() else nullcontext() \
                as existing:
            done = set() if overwrite else writer.pending_keys()
            # look up the images asked for, not every entry of the file (appends cost O(N))
            done |= set() if overwrite or existing is None else {n for n in names
                                                                 if n in existing}
            existing_dim = None if overwrite else _existing_dim(existing, done)
        todo = [n for n in names if n not in done]
        logger.info("Extracting %s features for %d images (%d already done) into %s.",
                    conf.get("name", ""), len(todo), len(names) - len(todo), feature_path)
        failures: dict[str, str] = {}
        as_half = conf["preprocessing"]["as_half"]
        pre = conf["preprocessing"]
        backend = backend or LocalBackend(conf, image_dir, featurizer, pre["num_workers"],
                                          pre["worker_type"])
        if getattr(backend, "packs_pieces", False):
            outcomes = backend(todo, storage=Storage(as_half, dict(writer.root_attrs)))
        else:
            outcomes = backend(todo)

        def check_dim(dim: int) -> None:
            if existing_dim is not None and dim != existing_dim:
                raise FormatError(
                    f"Features file {feature_path} holds {existing_dim}-D descriptors but conf "
                    f"'{conf.get('name')}' gives {dim}-D ones: use another --output "
                    "or --overwrite.")
            writer.root_attrs["featurizer_dim"] = dim

        with progress(None, total=len(todo), desc="extract", unit="img") as bar:
            for outcome in outcomes:
                if isinstance(outcome, Packed):  # a worker's finished batch, stored as it is
                    check_dim(outcome.dim)
                    writer.add_piece(outcome.piece, outcome.names)
                    bar.update(len(outcome.names))
                    continue
                name, result = outcome
                if isinstance(result, ImageReadError):
                    failures[name] = str(result)
                    logger.error("%s", result)
                else:
                    check_dim(result.descriptors.shape[1])
                    writer.write(name, feature_entry(result, as_half))
                bar.update()
        writer.finalize(drop_existing=not keep)
    except BaseException:
        writer.close()  # finished images stay in shards; the next run picks them up
        raise
    dim = conf["pca"]["dim"]
    if dim:
        from .pca import reduce_features_file

        reduce_features_file(feature_path, dim, names=names)  # what was asked, not the file
    if failures:
        raise PartialFailure(
            f"{len(failures)} of {len(names)} images failed (the others were written to "
            f"{feature_path}): " + "; ".join(f"{n}: {e}" for n, e in failures.items()), failures)
    return feature_path
