"""Sacre Coeur reconstruction: dift-sfm's `sift` conf against pycolmap's own SIFT pipeline.

Same machine, same run, same 10 photos, same mapper settings (pycolmap defaults, seed 0,
camera mode AUTO, SIMPLE_RADIAL). Each pipeline starts from an empty folder, so wall time
includes feature extraction, matching, verification and mapping.

- dift-sfm: `run_pipeline(get_conf('sift'), ...)` = DoG + RootSIFT (OpenCV), mutual NN,
  pycolmap verification + incremental mapping (what `dift-sfm reconstruct` runs).
- pycolmap: `extract_features` (COLMAP SIFT, CPU) -> `match_exhaustive` (ratio test + cross
  check + verification) -> `incremental_mapping`.

    python benchmarks/bench_sacre_coeur.py [--images ../shared/data/sacre_coeur] \
        [--output outputs/bench_sacre_coeur] [--retrieval-k 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import pycolmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dift_sfm.colmap.mapping import run_mapping, summarize_model  # noqa: E402
from dift_sfm.confs import get_conf  # noqa: E402
from dift_sfm.images import list_images  # noqa: E402
from dift_sfm.sfm import run_pipeline  # noqa: E402

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "sacre_coeur"


def _mapper_options() -> pycolmap.IncrementalPipelineOptions:
    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = 0
    return options


def run_ours(images: Path, out: Path, pairs: str = "exhaustive", k: int = 5) -> dict:
    t0 = time.perf_counter()
    _, s = run_pipeline(get_conf("sift"), images, out, pairs=pairs, num_neighbors=k)
    return {"wall_s": time.perf_counter() - t0, **_figures(s)}


def run_pycolmap(images: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    database = out / "database.db"
    names = list_images(images)  # the same images (skips the text file)
    t0 = time.perf_counter()
    pycolmap.extract_features(database, images, image_names=names,
                              camera_mode=pycolmap.CameraMode.AUTO, device=pycolmap.Device.cpu)
    t1 = time.perf_counter()
    pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
    t2 = time.perf_counter()
    models = run_mapping(database, images, out, options=_mapper_options())
    t3 = time.perf_counter()
    s = summarize_model(models[0], database, out, len(models))
    return {"wall_s": t3 - t0, "extract_s": t1 - t0, "match_verify_s": t2 - t1,
            "map_s": t3 - t2, **_figures(s)}


def _figures(s) -> dict:
    return {"registered": s.num_registered, "images": s.num_images, "points3D": s.num_points3D,
            "track_length": round(s.mean_track_length, 3),
            "reproj_px": round(s.mean_reprojection_error, 3),
            "verified_pairs": s.num_verified_pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--output", type=Path, default=Path("outputs/bench_sacre_coeur"))
    parser.add_argument("--retrieval-k", type=int, default=5,
                        help="also run ours with retrieval pairs (0: skip)")
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"{args.images} not found (the 10 Sacre Coeur photos).")
    shutil.rmtree(args.output, ignore_errors=True)
    rows = {"dift-sfm sift, exhaustive": run_ours(args.images, args.output / "ours")}
    if args.retrieval_k:
        rows[f"dift-sfm sift, retrieval k={args.retrieval_k}"] = run_ours(
            args.images, args.output / "ours-retrieval", "retrieval", args.retrieval_k)
    rows["pycolmap SIFT, exhaustive"] = run_pycolmap(args.images, args.output / "pycolmap")

    print(f"\n{datetime.date.today()} {platform.machine()} pycolmap {pycolmap.__version__}")
    print("| pipeline | registered | 3D points | mean track length | mean reproj. error (px) "
          "| verified pairs | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['registered']}/{r['images']} | {r['points3D']} | "
              f"{r['track_length']:.2f} | {r['reproj_px']:.2f} | {r['verified_pairs']} | "
              f"{r['wall_s']:.1f} |")
    (args.output / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
