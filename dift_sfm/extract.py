"""Step 1: detect and describe keypoints of a set of images -> features.h5 (hloc layout)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import DiftSfmError, FormatError, ImageReadError, PartialFailure
from .featurizers import Featurizer, get_featurizer
from .formats.features import feature_datasets, is_complete_features, list_names, read_root_attrs
from .formats.h5store import ShardedH5Writer, open_h5
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


def _check_file_conf(feature_path: Path, conf: dict, overwrite: bool) -> bool:
    """Whether an existing features file was written by another featurizer (then: start fresh)."""
    attrs = read_root_attrs(feature_path)
    if not attrs or "featurizer" not in attrs:
        return False
    old = json.loads(attrs.get("conf_json", "{}"))
    same = (attrs.get("featurizer") == conf["featurizer"]["name"]
            and old.get("featurizer") == conf["featurizer"]
            and old.get("keypoints") == conf["keypoints"])
    if same:
        return False
    if overwrite:
        logger.warning("Replacing %s: it was written by conf '%s', not '%s'.", feature_path,
                       attrs.get("conf"), conf.get("name"))
        return True
    raise FormatError(
        f"Features file {feature_path} was written by conf '{attrs.get('conf')}' "
        f"(featurizer '{attrs.get('featurizer')}', D={attrs.get('featurizer_dim')}) with other "
        f"settings than conf '{conf.get('name')}'. Use another --output, or --overwrite to "
        "replace it.")


def _existing_dim(feature_path: Path, done: set[str]) -> int | None:
    """Descriptor size of the entries already in the file (None if it has none)."""
    in_file = [n for n in list_names(feature_path) if n in done] if feature_path.exists() else []
    if not in_file or "pca_components" in read_root_attrs(feature_path):
        return None  # none yet, or PCA-reduced: new entries are reduced after extraction
    with open_h5(feature_path) as f:
        return int(f[in_file[0]]["descriptors"].shape[0])


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
    pre = conf.get("preprocessing", {})
    kconf = conf["keypoints"]
    h, w = image.shape[:2]
    min_size = pre.get("min_size", 16)
    if min(h, w) < min_size:
        raise ImageReadError(f"Image {name or ''} is {w}x{h}, smaller than the "
                             f"{min_size} px minimum of this conf (preprocessing.min_size).")
    resized, scale = resize_max(image, pre.get("resize_max"))
    if kconf.get("name") == "import":
        if name is None:
            raise DiftSfmError("Imported keypoints need the image name.")
        kpts = import_keypoints(name, **{k: v for k, v in kconf.items() if k != "name"})
        kpts_r = kpts.scaled((1 / scale[0], 1 / scale[1]))
    else:
        kpts_r = detect_keypoints(resized, kconf)
        kpts = kpts_r.scaled(scale)
    return PreparedImage(name or "", (w, h), resized, kpts, kpts_r)


def describe_image(image: np.ndarray, conf: dict, featurizer: Featurizer,
                   name: str | None = None) -> tuple[Keypoints, np.ndarray]:
    """Keypoints (original pixels) and (N, D) descriptors of one image (H, W, 3) in [0, 1]."""
    item = prepare_image(image, conf, name)
    desc = featurizer.describe_batch([item.resized], [item.keypoints_resized])[0]
    return item.keypoints, desc


def extract_features(
    conf: dict,
    image_dir: Path | str,
    feature_path: Path | str,
    image_list: Path | str | list[str] | None = None,
    overwrite: bool = False,
    featurizer: Featurizer | None = None,
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

    ``conf['featurizer']['batch_size']`` images (default 1) are described per featurizer call;
    on a GPU, batches share the diffusion model's calls (see docs/sd.md).
    """
    image_dir, feature_path = Path(image_dir), Path(feature_path)
    names = resolve_image_list(image_dir, image_list)
    feature_path.parent.mkdir(parents=True, exist_ok=True)
    fresh = feature_path.exists() and _check_file_conf(feature_path, conf, overwrite)
    root_attrs = {"conf": conf.get("name", ""), "featurizer": conf["featurizer"]["name"],
                  "conf_json": json.dumps({k: conf[k] for k in ("keypoints", "featurizer",
                                                                "preprocessing", "matcher")})}
    writer = ShardedH5Writer(feature_path, is_complete_features, root_attrs)
    done = set() if overwrite else set(list_names(feature_path)) | writer.pending_keys()
    todo = [n for n in names if n not in done]
    logger.info("Extracting %s features for %d images (%d already done) into %s.",
                conf.get("name", ""), len(todo), len(names) - len(todo), feature_path)
    failures: dict[str, str] = {}
    as_half = conf.get("preprocessing", {}).get("as_half", False)
    existing_dim = None if fresh or overwrite else _existing_dim(feature_path, done)
    batch_size = max(1, int(conf["featurizer"].get("batch_size") or 1))

    def flush(batch: list[PreparedImage]) -> None:
        descs = featurizer.describe_batch([b.resized for b in batch],
                                          [b.keypoints_resized for b in batch])
        for item, desc in zip(batch, descs, strict=True):
            if existing_dim is not None and desc.shape[1] != existing_dim:
                raise FormatError(
                    f"Features file {feature_path} holds {existing_dim}-D descriptors but conf "
                    f"'{conf.get('name')}' gives {desc.shape[1]}-D ones: use another --output "
                    "or --overwrite.")
            writer.root_attrs["featurizer_dim"] = desc.shape[1]
            kpts = item.keypoints
            writer.write(item.name, feature_datasets(kpts.xy, desc, kpts.scores,
                                                     item.image_size, as_half))
        batch.clear()

    try:
        if todo:
            featurizer = featurizer or get_featurizer(conf["featurizer"])
            batch: list[PreparedImage] = []
            for name, future in progress(prefetch(todo, lambda n: read_image(image_dir / n)),
                                         total=len(todo), desc="extract", unit="img"):
                try:
                    batch.append(prepare_image(future.result(), conf, name))
                except ImageReadError as err:
                    failures[name] = str(err)
                    logger.error("%s", err)
                    continue
                if len(batch) >= batch_size:
                    flush(batch)
            if batch:
                flush(batch)
        writer.finalize(drop_existing=fresh)
    except BaseException:
        writer.close()  # finished images stay in shards; the next run picks them up
        raise
    dim = (conf.get("pca") or {}).get("dim")
    if dim:
        from .pca import reduce_features_file

        reduce_features_file(feature_path, dim)
    if failures:
        raise PartialFailure(
            f"{len(failures)} of {len(names)} images failed (the others were written to "
            f"{feature_path}): " + "; ".join(f"{n}: {e}" for n, e in failures.items()), failures)
    return feature_path
