"""End-to-end `extract` rate against the featurizer's own rate: does the pipeline keep up?

Runs ``extract_features`` with the ``sift`` conf's preprocessing and keypoints (DoG, 4096,
resize_max 1600) on real photos, with a stand-in featurizer that takes ``--featurizer-ms``
milliseconds per image WITHOUT using the CPU (``time.sleep``, as a GPU featurizer leaves the
CPU free) and returns random L2-normalised descriptors of the right shape. So the pipeline
rate shows whether decoding, resizing, keypoint detection and writing hide behind the
featurizer.

    python benchmarks/bench_pipeline.py ../shared/data/sacre_coeur --featurizer-ms 300 --repeat 4

The last line printed is one JSON object: ``featurizer_img_per_s`` (the stand-in alone, on
prepared images), ``pipeline_img_per_s`` (images / wall time of ``extract_features``, start-up,
writing and the final merge included), ``ratio``, ``workers``, ``images``, ``machine``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dift_sfm.confs import get_conf  # noqa: E402
from dift_sfm.extract import LocalBackend, default_workers, extract_features  # noqa: E402
from dift_sfm.featurizers.base import Featurizer, KeypointsLike  # noqa: E402
from dift_sfm.images import list_images  # noqa: E402

logger = logging.getLogger("bench_pipeline")


class SleepFeaturizer(Featurizer):
    """Stand-in for a GPU featurizer: ``ms`` milliseconds per image of sleep, no CPU work.

    Returns the first N rows of a fixed (max_keypoints, dim) block of random unit rows, made
    once (so the stand-in spends no CPU per image).
    """

    default_conf = {"name": "sleep", "batch_size": 1, "ms": 300.0, "dim": 640,
                    "max_keypoints": 8192}

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        d = np.random.default_rng(0).standard_normal(
            (self.conf["max_keypoints"], self.conf["dim"])).astype(np.float32)
        self.block = d / np.linalg.norm(d, axis=1, keepdims=True)

    def describe_batch(self, images: Sequence[np.ndarray],
                       keypoints: Sequence[KeypointsLike]) -> list[np.ndarray]:
        time.sleep(self.conf["ms"] / 1000 * len(images))
        return [self.block[:len(k.xy)] for k in keypoints]


def repeated_folder(image_dir: Path, repeat: int, tmp: Path) -> Path:
    """A folder of symlinks naming every image of ``image_dir`` ``repeat`` times."""
    folder = tmp / "images"
    folder.mkdir()
    for r in range(repeat):
        for name in list_images(image_dir):
            link = folder / f"r{r:03d}_{name.replace('/', '_')}"
            link.symlink_to((image_dir / name).resolve())
    return folder


def featurizer_rate(featurizer: SleepFeaturizer, n: int = 5) -> float:
    """Images per second of the stand-in alone (on a typical input)."""
    image = np.zeros((1200, 1600, 3), np.float32)
    kpts = type("K", (), {"xy": np.zeros((4096, 2), np.float32), "sizes": None,
                          "angles": None})()
    t0 = time.perf_counter()
    for _ in range(n):
        featurizer.describe_batch([image], [kpts])
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_dir", type=Path)
    parser.add_argument("--featurizer-ms", type=float, default=300.0)
    parser.add_argument("--repeat", type=int, default=4, help="list every photo this often")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"preparation workers (default: {default_workers()} here; 0: none)")
    parser.add_argument("--worker-type", choices=["thread", "process"], default="thread")
    parser.add_argument("--dim", type=int, default=640, help="stand-in descriptor size")
    parser.add_argument("--batch-size", type=int, default=1, help="images per featurizer call")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    conf = get_conf("sift")  # DoG 4096 keypoints, resize_max 1600
    featurizer = SleepFeaturizer({"ms": args.featurizer_ms, "dim": args.dim,
                                  "batch_size": args.batch_size})
    workers = default_workers() if args.workers is None else args.workers
    with tempfile.TemporaryDirectory() as tmp:
        folder = repeated_folder(args.image_dir.resolve(), args.repeat, Path(tmp))
        images = len(list_images(folder))
        backend = LocalBackend(conf, folder, featurizer, num_workers=workers,
                               worker_type=args.worker_type)
        t0 = time.perf_counter()
        extract_features(conf, folder, Path(tmp) / "feats.h5", backend=backend)
        wall = time.perf_counter() - t0
    feat = featurizer_rate(featurizer)
    row = {"featurizer_ms": args.featurizer_ms, "featurizer_img_per_s": round(feat, 3),
           "pipeline_img_per_s": round(images / wall, 3), "ratio": round(images / wall / feat, 3),
           "wall_s": round(wall, 2), "workers": workers, "worker_type": args.worker_type,
           "batch_size": args.batch_size, "images": images,
           "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "date": datetime.date.today().isoformat()}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
