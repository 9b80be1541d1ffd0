"""HPatches / Oxford homography benchmark from Python (what `dift-sfm hpatches` runs).

    python pipelines/hpatches.py --root data/hpatches-sequences-release --conf sift \
        --subset 108 --output outputs/hpatches-sift

See docs/hpatches.md for the three protocols and their outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dift_sfm.confs import get_conf, parse_value
from dift_sfm.eval.hpatches import PROTOCOLS, run_hpatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, nargs="+", required=True,
                        help="HPatches release / Oxford folder(s), or single sequences")
    parser.add_argument("--conf", default="sift")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="conf override, e.g. featurizer.ensemble=1")
    parser.add_argument("--output", type=Path, default=Path("outputs/hpatches"))
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--subset", choices=["full", "108"], default="full")
    parser.add_argument("--max-keypoints", type=int)
    parser.add_argument("--keypoints-from", type=Path)
    args = parser.parse_args()

    overrides = dict(item.split("=", 1) for item in args.set)
    conf = get_conf(args.conf, {k: parse_value(v) for k, v in overrides.items()})
    run_hpatches(conf, args.root, args.output / args.conf, protocols=args.protocols,
                 subset=args.subset, max_keypoints=args.max_keypoints,
                 keypoints_from=args.keypoints_from)


if __name__ == "__main__":
    main()
