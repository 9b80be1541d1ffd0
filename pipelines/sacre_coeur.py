"""Reconstruct the 10 Sacre Coeur photos (what `dift-sfm reconstruct` runs).

    python pipelines/sacre_coeur.py --conf sift --output outputs/sacre_coeur
    python pipelines/sacre_coeur.py --conf dift-sd --pairs retrieval --num-neighbors 5

Writes OUTPUT/<conf>/{feats-*.h5, pairs-*.txt, feats-*_matches.h5, database.db, sparse/0}
and prints the summary. Re-running reuses the features and matches. See docs/reconstruction.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dift_sfm.colmap import CAMERA_MODES
from dift_sfm.confs import get_conf, parse_value
from dift_sfm.sfm import run_pipeline

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "sacre_coeur"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="image folder, default: %(default)s")
    parser.add_argument("--output", type=Path, default=Path("outputs/sacre_coeur"))
    parser.add_argument("--conf", default="sift")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="conf override, e.g. keypoints.max_keypoints=2048")
    parser.add_argument("--pairs", default="exhaustive",
                        help="exhaustive | sequential | retrieval | a pairs file")
    parser.add_argument("--num-neighbors", type=int, default=5)
    parser.add_argument("--camera-mode", choices=list(CAMERA_MODES), default="auto")
    args = parser.parse_args()

    if not args.images.is_dir():
        raise SystemExit(f"{args.images} not found: pass --images (the 10 Sacre Coeur photos "
                         "of hloc's datasets/sacre_coeur/mapping).")
    overrides = dict(item.split("=", 1) for item in args.set)
    conf = get_conf(args.conf, {k: parse_value(v) for k, v in overrides.items()})
    _, summary = run_pipeline(conf, args.images, args.output / args.conf, pairs=args.pairs,
                              num_neighbors=args.num_neighbors, camera_mode=args.camera_mode)
    print(summary.format())


if __name__ == "__main__":
    main()
