"""Relative pose on ScanNet-style pairs from Python (what `dift-sfm pose-bench` runs).

    python pipelines/scannet_pose.py --pairs ../shared/data/scannet_sample/pairs_with_gt.txt \
        --images ../shared/data/scannet_sample --conf sift --output outputs/scannet

AUC of max(rotation error, translation angle error) at 5/10/20 degrees; see
dift_sfm/eval/pose.py for the protocol.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dift_sfm.confs import get_conf, parse_value
from dift_sfm.eval.pose import run_pose_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, required=True, help="pairs_with_gt.txt")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--conf", default="sift")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, default=Path("outputs/scannet"))
    parser.add_argument("--threshold", type=float, default=2.0, help="RANSAC threshold, px")
    args = parser.parse_args()

    overrides = dict(item.split("=", 1) for item in args.set)
    conf = get_conf(args.conf, {k: parse_value(v) for k, v in overrides.items()})
    run_pose_benchmark(conf, args.pairs, args.images, args.output / args.conf,
                       threshold=args.threshold)


if __name__ == "__main__":
    main()
