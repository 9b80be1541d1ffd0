"""The ``dift-sfm`` command line. Each subcommand composes library steps; nothing here computes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from . import logger
from .confs import confs, get_conf, parse_value
from .errors import DiftSfmError


def add_conf_args(parser: argparse.ArgumentParser, default: str | None = "sift") -> None:
    """The options shared by every command that runs a conf."""
    parser.add_argument("--conf", default=default,
                        help=f"named conf (see `dift-sfm confs`), default: {default}")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override any conf field, dotted, e.g. --set featurizer.t=41 "
                             "--set keypoints.name=gftt (repeatable; values parsed as JSON)")
    parser.add_argument("--model", help="featurizer model: hub id, local folder or checkpoint file")
    parser.add_argument("--max-keypoints", type=int, help="keypoints.max_keypoints")
    parser.add_argument("--device", help="featurizer.device, e.g. cpu, cuda, cuda:1")


def conf_from_args(args: argparse.Namespace, name: str | None = None) -> dict[str, Any]:
    """Resolve ``--conf`` plus ``--set``/shorthand overrides into a conf dict."""
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        if "=" not in item:
            raise DiftSfmError(f"--set expects KEY=VALUE, got '{item}'.")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value.strip())
    if getattr(args, "model", None):
        overrides["featurizer.model"] = args.model
    if getattr(args, "max_keypoints", None):
        overrides["keypoints.max_keypoints"] = args.max_keypoints
    if getattr(args, "device", None):
        overrides["featurizer.device"] = args.device
    return get_conf(name or args.conf, overrides)


# --------------------------------------------------------------------------- confs
def _add_confs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("confs", help="list the named confs (or print one in full)")
    p.add_argument("name", nargs="?", help="print this conf in full")
    p.set_defaults(func=_run_confs)


def _run_confs(args: argparse.Namespace) -> int:
    import json

    if args.name:
        print(json.dumps(get_conf(args.name), indent=2))
        return 0
    for name, conf in confs.items():
        f, k, m = conf["featurizer"], conf["keypoints"], conf["matcher"]
        print(f"{name:20s} featurizer={f['name']:5s} keypoints={k['name']:6s} "
              f"matcher={m['name']}/{m['metric']}")
    return 0


# --------------------------------------------------------------------------- extract
def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="detect keypoints and describe them -> features.h5")
    p.add_argument("image_dir", type=Path)
    p.add_argument("--output", "-o", type=Path, required=True, help="features.h5 to write")
    p.add_argument("--image-list", type=Path,
                   help="text file of image names (relative to IMAGE_DIR), one per line")
    p.add_argument("--overwrite", action="store_true", help="recompute images already done")
    add_conf_args(p)
    p.set_defaults(func=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from .extract import extract_features

    extract_features(conf_from_args(args), args.image_dir, args.output,
                     image_list=args.image_list, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------- pairs
def _add_pairs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pairs", help="write an image pairs file (hloc format)")
    p.add_argument("strategy", choices=["exhaustive", "sequential"])
    p.add_argument("image_dir", type=Path)
    p.add_argument("--output", "-o", type=Path, required=True)
    p.add_argument("--image-list", type=Path)
    p.add_argument("--window", type=int, default=5, help="sequential: neighbours after each image")
    p.add_argument("--wrap", action="store_true", help="sequential: the sequence is a loop")
    p.set_defaults(func=_run_pairs)


def _run_pairs(args: argparse.Namespace) -> int:
    from .images import resolve_image_list
    from .pairs import exhaustive_pairs, sequential_pairs, write_pairs

    names = resolve_image_list(args.image_dir, args.image_list)
    if args.strategy == "exhaustive":
        pairs = exhaustive_pairs(names)
    else:
        pairs = sequential_pairs(names, window=args.window, wrap=args.wrap)
    write_pairs(args.output, pairs)
    logger.info("Wrote %d pairs of %d images to %s.", len(pairs), len(names), args.output)
    return 0


# --------------------------------------------------------------------------- match
def _add_match(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("match", help="mutual nearest neighbour matching -> matches.h5")
    p.add_argument("pairs", type=Path, help="pairs file: 'name0 name1' per line")
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--output", "-o", type=Path, required=True, help="matches.h5 to write")
    p.add_argument("--overwrite", action="store_true")
    add_conf_args(p, default=None)
    p.set_defaults(func=_run_match)


def _run_match(args: argparse.Namespace) -> int:
    from .formats.features import read_conf_name
    from .match import match_features

    name = args.conf or read_conf_name(args.features) or "sift"
    match_features(conf_from_args(args, name), args.pairs, args.features, args.output,
                   overwrite=args.overwrite)
    return 0


# --- hpatches / pose-bench commands (issue 5) go below this line ---

# --- reconstruct / colmap-import commands (issue 6) go below this line ---


_ADDERS = [_add_confs, _add_extract, _add_pairs, _add_match]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dift-sfm",
        description="DIFT diffusion features as a keypoint describer and matcher for hloc/COLMAP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logger.setLevel(level)
    try:
        return args.func(args)
    except DiftSfmError as err:
        logger.error("%s", err)
        return 1
    except KeyboardInterrupt:
        logger.error("Interrupted; completed work is kept, re-run the same command to resume.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
