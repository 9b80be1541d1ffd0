"""What the benchmarks cache in their output folders, and under which names.

- :func:`conf_tag`: ``<conf name>-<hash>``, part of the cached features/matches file names, so
  that another conf (or ``--set``) gets new files while a re-run reuses the old ones;
- the glue-factory protocol's image copies resized to a short side (:func:`resize_short_side`,
  named by :func:`resized_name`) and imported keypoints mapped into them
  (:func:`write_scaled_keypoints`).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..errors import DiftSfmError
from ..formats.features import FeaturesReader, feature_datasets, is_complete_features
from ..formats.h5store import ShardedH5Writer
from ..formats.resume import CONF_SECTIONS, settings_tag
from ..geometry import scale_pixel_coords
from ..images import decode_raw, read_header, read_image_bytes, resize_image, resized_size


def conf_tag(conf: dict) -> str:
    """``<conf name>-<8 hex>``: a hash of every setting that changes the features or matches,
    by the resume rule (``formats.resume.settings_tag``: runtime keys such as ``device`` or
    ``cache_mb`` change where and how fast, not what, so they keep the cached files)."""
    return f"{conf.get('name', 'conf')}-{settings_tag({k: conf.get(k) for k in CONF_SECTIONS})}"


def resized_name(name: str) -> str:
    """Name of the resized copy of image ``name`` (PNG, same folders)."""
    return str(Path(name).with_suffix(".png").as_posix())


def resize_short_side(src: Path, dst: Path, short_side: int) -> tuple[float, float]:
    """Cache ``src`` resized (``images.resize_image``, up or down) so its short side is
    ``short_side`` px, as ``dst`` (PNG, same sample type; kept when a copy of that size is
    there). Returns the scale (sx, sy) = new / original size."""
    image = decode_raw(read_image_bytes(Path(src)), src)
    h, w = image.shape[:2]
    nw, nh = resized_size((w, h), short_side, short=True, upscale=True)
    if dst.exists():
        old = read_header(dst.read_bytes())
        if old is not None and old.size == (nw, nh):
            return nw / w, nh / h
    resized, scale = resize_image(image, short_side, short=True, upscale=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.stem + ".tmp.png")
    if not cv2.imwrite(str(tmp), resized):
        raise DiftSfmError(f"Could not write resized image {tmp}.")
    tmp.replace(dst)
    return scale


def write_scaled_keypoints(src: Path, dst: Path, names: dict[str, str],
                           scales: dict[str, tuple[float, float]]) -> Path:
    """Write the keypoints of ``names`` (src name -> dst name) of the hloc features file ``src``,
    mapped into the resized frames (:func:`~dift_sfm.geometry.scale_pixel_coords`), into a new
    features file ``dst`` (no descriptors; atomically replaced)."""
    writer = ShardedH5Writer(dst, is_complete_features)
    writer.discard_pending()  # rewritten whole each run: leftovers of a killed run are stale
    try:
        with FeaturesReader(src) as features:
            for name, new in names.items():
                s = np.asarray(scales[name], np.float32)
                xy = scale_pixel_coords(features.keypoints(name), s)
                w, h = features.image_size(name)
                writer.write(new, feature_datasets(xy, np.zeros((len(xy), 0), np.float32),
                                                   features.scores(name),
                                                   (round(w * s[0]), round(h * s[1]))))
        writer.finalize(drop_existing=True)
    finally:
        writer.close()
    return dst
