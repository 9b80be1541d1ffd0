"""Match results of float16-stored vs float32-stored descriptors (``preprocessing.as_half``).

For each conf (``sift``; ``dift-sd`` with the tiny SD model of ../shared/conformance at
256x256), the photos are extracted twice, once with ``as_half=false`` and once with
``as_half=true`` (same keypoints: the detector does not see the setting), then every pair
(exhaustive) is matched with the conf's matcher, which reads both as float32. Reported per
conf: keypoints identical, the share of pairs whose matches are identical, the matches
common to both over their union (Jaccard, pooled over pairs), and the match counts. Last
line: JSON.

    python benchmarks/bench_half.py [--images ../shared/data/sacre_coeur] \
        [--output outputs/bench_half] [--tiny-sd ../shared/conformance/sd/model]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dift_sfm.confs import get_conf  # noqa: E402
from dift_sfm.extract import extract_features  # noqa: E402
from dift_sfm.formats.features import FeaturesReader  # noqa: E402
from dift_sfm.formats.matches import read_matches  # noqa: E402
from dift_sfm.match import match_features  # noqa: E402
from dift_sfm.pairs import exhaustive_pairs, write_pairs  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def compare(name: str, overrides: dict, images: Path, out: Path) -> dict:
    """Extract and match ``images`` with conf ``name`` stored in float32 and in float16."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for half in (False, True):
        conf = get_conf(name, {**overrides, "preprocessing.as_half": half})
        feats = out / f"{name}-{'f16' if half else 'f32'}.h5"
        t0 = time.perf_counter()
        extract_features(conf, images, feats)
        extract_s = time.perf_counter() - t0
        names = FeaturesReader(feats).names
        pairs = out / "pairs.txt"
        write_pairs(pairs, exhaustive_pairs(names))
        matches = out / f"{name}-{'f16' if half else 'f32'}_matches.h5"
        t0 = time.perf_counter()
        match_features(conf, pairs, feats, matches)
        files[half] = (feats, matches, extract_s, time.perf_counter() - t0, feats.stat().st_size)
    (f32, m32, *_), (f16, m16, *_) = files[False], files[True]
    with FeaturesReader(f32) as a, FeaturesReader(f16) as b:
        same_kpts = all(np.array_equal(a.keypoints(n), b.keypoints(n)) for n in names)
        max_desc_err = max(float(np.abs(a.descriptors(n) - b.descriptors(n)).max())
                           for n in names)
    identical = common = union = n32 = n16 = 0
    pairs_list = exhaustive_pairs(names)
    for n0, n1 in pairs_list:
        x, _ = read_matches(m32, n0, n1)
        y, _ = read_matches(m16, n0, n1)
        sx, sy = set(map(tuple, x.tolist())), set(map(tuple, y.tolist()))
        identical += sx == sy
        common += len(sx & sy)
        union += len(sx | sy)
        n32 += len(sx)
        n16 += len(sy)
    return {
        "conf": name, "images": len(names), "pairs": len(pairs_list),
        "keypoints_identical": same_kpts, "max_descriptor_abs_diff": max_desc_err,
        "pairs_identical": identical, "jaccard": common / max(union, 1),
        "matches_f32": n32, "matches_f16": n16,
        "file_mb_f32": files[False][4] / 2**20, "file_mb_f16": files[True][4] / 2**20,
        "match_s_f32": files[False][3], "match_s_f16": files[True][3],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, default=SHARED / "data" / "sacre_coeur")
    p.add_argument("--output", type=Path, default=Path("outputs/bench_half"))
    p.add_argument("--tiny-sd", type=Path, default=SHARED / "conformance" / "sd" / "model")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(args.output, ignore_errors=True)
    rows = [compare("sift", {}, args.images, args.output / "sift")]
    if (args.tiny_sd / "unet").is_dir():
        rows.append(compare("dift-sd", {"featurizer.model": str(args.tiny_sd),
                                        "featurizer.device": "cpu",
                                        "featurizer.img_size": [256, 256]},
                            args.images, args.output / "dift-sd"))
    for r in rows:
        print(f"{r['conf']:8s} {r['pairs']} pairs: identical {r['pairs_identical']}, "
              f"Jaccard {r['jaccard']:.4f}, matches {r['matches_f32']} (f32) vs "
              f"{r['matches_f16']} (f16), file {r['file_mb_f32']:.1f} -> "
              f"{r['file_mb_f16']:.1f} MiB, max |d32 - d16| {r['max_descriptor_abs_diff']:.2e}")
    print(json.dumps({"bench": "half", "results": rows}))


if __name__ == "__main__":
    main()
