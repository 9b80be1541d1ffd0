"""The ``dift-sfm`` command line. Each subcommand composes library steps; nothing here computes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from . import interrupts, logger
from .colmap import CAMERA_MODES, DEFAULT_CAMERA_MODE, DEFAULT_CAMERA_MODEL, MAPPERS
from .confs import confs, describe_conf, get_conf, parse_value
from .errors import DiftSfmError
from .eval import PROTOCOLS
from .eval.datasets import SUBSETS
from .geometry import HOMOGRAPHY_METHODS
from .pairs import PAIR_STRATEGIES, SEQUENTIAL_WINDOW
from .retrieval import METHODS as RETRIEVAL_METHODS
from .retrieval import NUM_NEIGHBORS


def add_conf_args(parser: argparse.ArgumentParser, default: str | None = "sift",
                  conf_help: str | None = None) -> None:
    """The options shared by every command that runs a conf."""
    parser.add_argument("--conf", default=default,
                        help=conf_help or f"named conf (see `dift-sfm confs`), default: {default}")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override any conf field, dotted, e.g. --set featurizer.t=41 "
                             "--set keypoints.name=gftt (repeatable; values parsed as JSON)")
    parser.add_argument("--model", help="featurizer model: hub id, local folder or checkpoint file")
    parser.add_argument("--max-keypoints", type=int, help="keypoints.max_keypoints")
    parser.add_argument("--device", help="featurizer.device, e.g. cpu, cuda, cuda:1")


def overrides_from_args(args: argparse.Namespace, device_key: str = "featurizer.device"
                        ) -> dict[str, Any]:
    """``--set`` and the shorthand options as dotted overrides."""
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        if "=" not in item:
            raise DiftSfmError(f"--set expects KEY=VALUE, got '{item}'.")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value.strip())
    if getattr(args, "model", None):
        overrides["featurizer.model"] = args.model
    if getattr(args, "max_keypoints", None) is not None:  # 0 and -1 are checked, not dropped
        overrides["keypoints.max_keypoints"] = args.max_keypoints
    if getattr(args, "device", None):
        overrides[device_key] = args.device
    return overrides


def conf_from_args(args: argparse.Namespace, name: str | None = None) -> dict[str, Any]:
    """Resolve ``--conf`` plus ``--set``/shorthand overrides into a complete conf."""
    name, overrides = name or args.conf, overrides_from_args(args)
    if getattr(args, "device", None):  # a featurizer without a device option: say so
        featurizer = get_conf(name, {k: v for k, v in overrides.items()
                                     if k != "featurizer.device"})["featurizer"]
        if "device" not in featurizer:
            raise DiftSfmError(f"--device: featurizer '{featurizer['name']}' has no device "
                               "option (it runs on the CPU); leave --device out.")
    return get_conf(name, overrides)


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """--ray and its options (Ray is imported only when --ray is given)."""
    group = parser.add_argument_group("Ray cluster (pip install \"dift-sfm[ray]\")")
    group.add_argument("--ray", action="store_true",
                       help="run on a Ray cluster: --ray-address, else RAY_ADDRESS, else a "
                            "local cluster using every GPU of this machine")
    group.add_argument("--ray-address", metavar="ADDRESS",
                       help="Ray cluster to join, e.g. ray://head:10001 or head:6379")
    group.add_argument("--workers", type=int, metavar="N",
                       help="model-holding workers (default: one per GPU; CPU confs: half "
                            "the cluster's CPUs)")
    group.add_argument("--ray-shared-fs", action="store_true",
                       help="workers read the images from the same path (shared filesystem) "
                            "instead of receiving their bytes from this process")


def ray_options_from_args(args: argparse.Namespace):
    """``RayOptions`` of --ray-address/--workers/--ray-shared-fs, or None without --ray."""
    if not getattr(args, "ray", False):
        if getattr(args, "ray_address", None) or getattr(args, "ray_shared_fs", False) \
                or getattr(args, "workers", None):
            raise DiftSfmError("--ray-address, --workers and --ray-shared-fs need --ray.")
        return None
    from .distributed import RayOptions

    if args.workers is not None and args.workers < 1:
        raise DiftSfmError(f"--workers must be at least 1, got {args.workers}.")
    return RayOptions(address=args.ray_address, workers=args.workers,
                      shared_fs=args.ray_shared_fs)


def _command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that also takes -v/-q after its name."""
    return sub.add_parser(name, help=help, parents=[_verbosity()])


# --------------------------------------------------------------------------- confs
def _add_confs(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "confs", "list the named confs (or print one in full)")
    p.add_argument("name", nargs="?", help="print this conf in full")
    p.set_defaults(func=_run_confs)


def _run_confs(args: argparse.Namespace) -> int:
    import json

    if args.name:
        print(json.dumps(get_conf(args.name), indent=2))
        return 0
    for name in confs:
        print(f"{name:18s} {describe_conf(get_conf(name))}")
    return 0


# --------------------------------------------------------------------------- extract
def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "extract", "detect keypoints and describe them -> features.h5")
    p.add_argument("image_dir", type=Path)
    p.add_argument("--output", "-o", type=Path, required=True, help="features.h5 to write")
    p.add_argument("--image-list", type=Path,
                   help="text file of image names (relative to IMAGE_DIR), one per line")
    p.add_argument("--overwrite", action="store_true", help="recompute images already done")
    add_conf_args(p)
    add_ray_args(p)
    p.set_defaults(func=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from .extract import extract_features

    conf, ray_options, backend = conf_from_args(args), ray_options_from_args(args), None
    if ray_options is not None:
        from .distributed import RayExtractBackend

        backend = RayExtractBackend(conf, args.image_dir, ray_options)
    extract_features(conf, args.image_dir, args.output,
                     image_list=args.image_list, overwrite=args.overwrite, backend=backend)
    return 0


# --------------------------------------------------------------------------- pairs
def _add_pairs(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "pairs", "write an image pairs file (hloc format)")
    p.add_argument("strategy", choices=list(PAIR_STRATEGIES))
    p.add_argument("image_dir", type=Path)
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="pairs file to write: 'name0 name1' per line (hloc format)")
    p.add_argument("--image-list", type=Path,
                   help="text file of image names (relative to IMAGE_DIR), one per line")
    p.add_argument("--window", type=int,
                   help=f"sequential: neighbours after each image (default: {SEQUENTIAL_WINDOW})")
    p.add_argument("--wrap", action="store_true", help="sequential: the sequence is a loop")
    p.add_argument("--features", type=Path,
                   help="retrieval: features.h5 whose descriptors give the global descriptor "
                        "(without it: the 'tiny' thumbnail + colour histogram descriptor)")
    p.add_argument("--num-neighbors", type=int,
                   help=f"retrieval: top-k per image (default: {NUM_NEIGHBORS})")
    p.add_argument("--retrieval-method", choices=list(RETRIEVAL_METHODS),
                   help="retrieval global descriptor (default: vlad with --features, else tiny)")
    p.set_defaults(func=_run_pairs)


def _run_pairs(args: argparse.Namespace) -> int:
    from .images import resolve_image_list
    from .pairs import check_pair_args, generate_pairs, write_pairs

    check_pair_args(args.strategy, args.window, args.num_neighbors)
    names = resolve_image_list(args.image_dir, args.image_list)
    pairs, _ = generate_pairs(args.strategy, names, window=args.window, wrap=args.wrap,
                              num_neighbors=args.num_neighbors, feature_path=args.features,
                              image_dir=args.image_dir, retrieval_method=args.retrieval_method)
    write_pairs(args.output, pairs)
    logger.info("Wrote %d pairs of %d images to %s.", len(pairs), len(names), args.output)
    return 0


# --------------------------------------------------------------------------- match
def _add_match(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "match", "mutual nearest neighbour matching -> matches.h5")
    p.add_argument("pairs", type=Path, help="pairs file: 'name0 name1' per line")
    p.add_argument("--features", type=Path, required=True,
                   help="features.h5 written by `dift-sfm extract` (or hloc)")
    p.add_argument("--output", "-o", type=Path, required=True, help="matches.h5 to write")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute pairs already in the output (also replaces an output "
                        "computed from other features or matcher settings)")
    p.add_argument("--conf", help="named conf; default: the conf stored in the features file "
                                  "by `extract`, as written (its features settings must match)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a matcher setting, e.g. --set matcher.ratio_threshold=0.8")
    p.add_argument("--device", help="matcher.device, e.g. cpu, cuda")
    add_ray_args(p)
    p.set_defaults(func=_run_match)


def _run_match(args: argparse.Namespace) -> int:
    from .match import conf_for_matching, match_features

    conf = conf_for_matching(args.features, args.conf,
                             overrides_from_args(args, device_key="matcher.device"))
    ray_options, backend = ray_options_from_args(args), None
    if ray_options is not None:
        from .distributed import RayMatchBackend

        backend = RayMatchBackend(conf["matcher"], ray_options)
    match_features(conf, args.pairs, args.features, args.output, overwrite=args.overwrite,
                   backend=backend)
    return 0


def _add_hpatches(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "hpatches", "HPatches / Oxford homography benchmark (3 protocols)")
    p.add_argument("roots", type=Path, nargs="+", metavar="ROOT",
                   help="folder(s) of sequences (HPatches release, Oxford affine) or sequences")
    p.add_argument("--output", "-o", type=Path, default=Path("outputs/hpatches"),
                   help="results and cached features/matches (resumable), default: %(default)s")
    p.add_argument("--protocol", choices=[*PROTOCOLS, "all"], default=None,
                   action="append", dest="protocols",
                   help="dift: accuracy @1/3/5 px at full res; gluefactory: AUC @1/3/5 px at "
                        "short side 480; mma: D2-Net MMA @1..10 px (repeatable, default all)")
    p.add_argument("--subset", choices=list(SUBSETS), default="full",
                   help="108: drop the 8 sequences with images over 1600x1200")
    p.add_argument("--keypoints-from", type=Path,
                   help="describe the keypoints of this hloc features.h5 instead of detecting")
    p.add_argument("--estimator", choices=list(HOMOGRAPHY_METHODS),
                   help="dift protocol estimator (default: lmeds for dift-sd, else ransac)")
    p.add_argument("--threshold", type=float, help="dift protocol inlier threshold, px (3)")
    p.add_argument("--gf-threshold", default=None,
                   help="gluefactory protocol pycolmap threshold in px (1.0), or 'auto'")
    p.add_argument("--num-viz", type=int, help="match plots to draw (default: num_viz of "
                                                 "dift_sfm.eval.hpatches.default_conf)")
    p.add_argument("--overwrite", action="store_true", help="recompute cached features/matches")
    add_conf_args(p)
    p.set_defaults(func=_run_hpatches)


def _run_hpatches(args: argparse.Namespace) -> int:
    from .eval.hpatches import run_hpatches

    chosen = args.protocols or ["all"]
    protocols = PROTOCOLS if "all" in chosen else tuple(dict.fromkeys(chosen))
    gf = args.gf_threshold
    if gf is not None and gf != "auto":
        try:
            gf = float(gf)
        except ValueError as err:
            raise DiftSfmError(f"--gf-threshold expects a number or 'auto', got '{gf}'.") from err
    from .eval.report import hpatches_table

    results = run_hpatches(conf_from_args(args), args.roots, args.output, protocols=protocols,
                           subset=args.subset, max_keypoints=args.max_keypoints,
                           keypoints_from=args.keypoints_from, estimator=args.estimator,
                           threshold=args.threshold, gf_threshold=gf, num_viz=args.num_viz,
                           overwrite=args.overwrite)
    print(hpatches_table(results))  # the result is the product: printed even with -q
    return 0


def _add_pose_bench(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "pose-bench", "relative pose benchmark on a pairs_with_gt.txt file")
    p.add_argument("pairs", type=Path, metavar="PAIRS_WITH_GT",
                   help="SuperGlue format: name0 name1 rot0 rot1 K0(9) K1(9) T_0to1(16)")
    p.add_argument("--images", type=Path, required=True, help="folder the names are relative to")
    p.add_argument("--output", "-o", type=Path, required=True)
    p.add_argument("--threshold", type=float,
                   help="essential matrix RANSAC threshold, px of the stored images (default: "
                        "the threshold of dift_sfm.eval.pose.run_pose_benchmark)")
    p.add_argument("--overwrite", action="store_true")
    add_conf_args(p)
    p.set_defaults(func=_run_pose_bench)


def _run_pose_bench(args: argparse.Namespace) -> int:
    from .eval.pose import run_pose_benchmark
    from .eval.report import pose_table

    given = {} if args.threshold is None else {"threshold": args.threshold}
    results = run_pose_benchmark(conf_from_args(args), args.pairs, args.images, args.output,
                                 overwrite=args.overwrite, **given)
    print(pose_table(results))  # the result is the product: printed even with -q
    return 0


# --------------------------------------------------------------------------- COLMAP
def _add_camera_args(p: argparse.ArgumentParser) -> None:

    p.add_argument("--camera-mode", choices=list(CAMERA_MODES), default=DEFAULT_CAMERA_MODE,
                   help="which images share intrinsics (auto: same size + same EXIF camera and "
                        "focal), default: %(default)s")
    p.add_argument("--camera-model", default=DEFAULT_CAMERA_MODEL,
                   help="COLMAP camera model, e.g. SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, "
                        "OPENCV (default: %(default)s)")


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "reconstruct", "extract, pair, match, then COLMAP mapping "
                                           "-> OUTPUT/sparse/0")
    p.add_argument("image_dir", type=Path)
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="folder for features, pairs, matches, database.db and sparse/")
    p.add_argument("--image-list", type=Path,
                   help="text file of image names (relative to IMAGE_DIR), one per line")
    p.add_argument("--pairs", default="exhaustive", metavar="exhaustive|sequential|retrieval|FILE",
                   help="pair strategy or a pairs file (default: %(default)s)")
    p.add_argument("--window", type=int,
                   help=f"sequential: neighbours after each image (default: {SEQUENTIAL_WINDOW})")
    p.add_argument("--num-neighbors", type=int,
                   help=f"retrieval: most similar images paired with each image (default: "
                        f"{NUM_NEIGHBORS})")
    p.add_argument("--retrieval-method", choices=list(RETRIEVAL_METHODS), default=None,
                   help="retrieval global descriptor (default vlad of the local descriptors)")
    _add_camera_args(p)
    p.add_argument("--min-model-size", type=int, default=None,
                   help="fewest registered images for a model to be kept (default: COLMAP's "
                        "10, capped at the number of images)")
    p.add_argument("--mapper", choices=list(MAPPERS), default=MAPPERS[0],
                   help="COLMAP mapper (see docs/reconstruction.md), default: %(default)s")
    p.add_argument("--overwrite", action="store_true", help="recompute features and matches")
    p.add_argument("--features", type=Path,
                   help="map existing files instead (e.g. hloc's, or those of a colmap-import): "
                        "this features.h5, with --matches and --pairs FILE; nothing is "
                        "extracted or matched")
    p.add_argument("--matches", type=Path, help="the matches.h5 that goes with --features")
    add_conf_args(p, default=None,
                  conf_help="named conf (see `dift-sfm confs`), default: sift")
    add_ray_args(p)
    p.set_defaults(func=_run_reconstruct)


#: what ``reconstruct`` does only when it extracts and matches: refused with --features
_COMPUTE_OPTIONS = {"window": "--window", "num_neighbors": "--num-neighbors",
                    "retrieval_method": "--retrieval-method", "overwrite": "--overwrite",
                    "conf": "--conf", "overrides": "--set", "model": "--model",
                    "max_keypoints": "--max-keypoints", "device": "--device", "ray": "--ray",
                    "ray_address": "--ray-address", "workers": "--workers",
                    "ray_shared_fs": "--ray-shared-fs"}


def _run_reconstruct(args: argparse.Namespace) -> int:
    from .sfm import run_pipeline

    if args.features is not None or args.matches is not None:
        summary = _reconstruct_existing(args)
    else:
        args.conf = args.conf or "sift"
        _, summary = run_pipeline(
            conf_from_args(args), args.image_dir, args.output, pairs=args.pairs,
            window=args.window, num_neighbors=args.num_neighbors,
            retrieval_method=args.retrieval_method, image_list=args.image_list,
            camera_mode=args.camera_mode, camera_model=args.camera_model,
            min_model_size=args.min_model_size, overwrite=args.overwrite,
            ray=ray_options_from_args(args), mapper=args.mapper)
    print(summary.format())
    if summary.failed_images:  # like `extract`: the rest is done, but say so in the exit code
        logger.error("%d unreadable image(s) are not in the model: %s",
                     len(summary.failed_images), ", ".join(summary.failed_images))
        return 1
    return 0


def _reconstruct_existing(args: argparse.Namespace):
    """``reconstruct --features F --matches M --pairs FILE``: database, verification and the
    chosen mapper on existing hloc files (``sfm.reconstruct``, as hloc's reconstruction)."""
    from .images import read_image_list
    from .report.reconstruction import report_after_run
    from .sfm import reconstruct

    if args.features is None or args.matches is None:
        raise DiftSfmError("--features and --matches go together: give both files to map "
                           "them, or neither to extract and match the images.")
    given = [flag for dest, flag in _COMPUTE_OPTIONS.items() if getattr(args, dest, None)]
    if given:
        raise DiftSfmError(f"{given[0]} only applies when `reconstruct` extracts and matches; "
                           "with --features/--matches the files are mapped as they are.")
    pairs = Path(args.pairs)
    if not pairs.is_file():
        raise DiftSfmError(f"With --features/--matches, --pairs must be the pairs file the "
                           f"matches were computed for; '{args.pairs}' is not a file.")
    for path in (args.features, args.matches):
        if not path.is_file():
            raise DiftSfmError(f"{path} does not exist.")
    names = None if args.image_list is None else read_image_list(args.image_list)
    _, summary = reconstruct(args.output, args.image_dir, pairs, args.features, args.matches,
                             args.camera_mode, args.camera_model, image_list=names,
                             min_model_size=args.min_model_size, mapper=args.mapper)
    report_after_run(args.output, args.image_dir, summary, args.features, args.matches, pairs)
    return summary


def _add_colmap_import(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "colmap-import", "write features.h5 keypoints and matches.h5 raw "
                                             "matches into an existing COLMAP database")
    p.add_argument("--database", type=Path, required=True, help="existing COLMAP database.db")
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--matches", type=Path, required=True)
    p.add_argument("--pairs", type=Path, required=True, help="the pairs to import")
    p.add_argument("--overwrite", action="store_true",
                   help="replace keypoints/matches already in the database for these images")
    p.set_defaults(func=_run_colmap_import)


def _run_colmap_import(args: argparse.Namespace) -> int:
    from .colmap.database import import_into_database

    stats = import_into_database(args.database, args.features, args.matches, args.pairs,
                                 overwrite=args.overwrite)
    print(f"Imported {stats.num_images} images ({stats.num_keypoints} keypoints) and "
          f"{stats.num_pairs} pairs ({stats.num_matches} raw matches) into {args.database}.\n"
          f"Next: geometric verification, pycolmap.geometric_verification('{args.database}')"
          ", then mapping (`colmap mapper`, pycolmap.incremental_mapping or global_mapping); "
          "or map these files in a new database with the mapper of your choice: `dift-sfm "
          "reconstruct IMAGE_DIR -o OUT --features ... --matches ... --pairs ... --mapper "
          "incremental|global|hierarchical`.")
    return 0


# --------------------------------------------------------------------------- report
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "report", "write a self-contained report.html of a COLMAP model (3D "
                                "view, match graph, pairs, unregistered images and why)")
    p.add_argument("model", type=Path, metavar="MODEL_DIR",
                   help="a `dift-sfm reconstruct` output folder, or a COLMAP model folder")
    p.add_argument("--output", "-o", type=Path,
                   help="HTML file to write (default: report.html in the run's folder)")
    p.add_argument("--images", type=Path,
                   help="image folder, for the pair thumbnails (default: the run's, if recorded)")
    p.add_argument("--database", type=Path,
                   help="COLMAP database.db (default: the one beside the model, if any)")
    p.add_argument("--features", type=Path, help="features.h5 (instead of a database)")
    p.add_argument("--matches", type=Path, help="matches.h5 (with --features)")
    p.add_argument("--pairs", type=Path, help="pairs file (default: the run's pairs-*.txt)")
    p.add_argument("--max-points", type=int, default=200_000,
                   help="3D points drawn at most (a seeded subset), default: %(default)s")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .report import write_sfm_report

    path = write_sfm_report(args.model, args.output, image_dir=args.images,
                            database=args.database, features=args.features,
                            matches=args.matches, pairs=args.pairs, max_points=args.max_points)
    print(path)
    return 0


_ADDERS = [_add_confs, _add_extract, _add_pairs, _add_match, _add_hpatches, _add_pose_bench,
           _add_reconstruct, _add_colmap_import, _add_report]


def _verbosity() -> argparse.ArgumentParser:
    """-v/-q, accepted before or after the subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging")
    parent.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only (results tables are still printed)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dift-sfm", parents=[_verbosity()],
        description="DIFT diffusion features as a keypoint describer and matcher for hloc/COLMAP.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    interrupts.install()  # SIGTERM finishes like Ctrl-C: shards kept, one line, exit 130
    try:
        return args.func(args)
    except DiftSfmError as err:
        logger.error("%s", err)
        return 1
    except OSError as err:  # disk full, read-only folder, ...: one line naming the path
        where = err.filename or "an output file"
        logger.error("%s: %s. Finished work is kept; fix this and re-run the same command.",
                     where, err.strerror or err)
        return 1
    except KeyboardInterrupt:
        logger.error("Interrupted; completed work is kept, re-run the same command to resume.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
