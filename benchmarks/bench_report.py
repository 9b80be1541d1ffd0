"""Size and build cost of ``report.html`` for a large synthetic model (no GPU, no features).

Builds in code a ``pycolmap.Reconstruction`` of ``--images`` cameras on a ring looking at a
cylinder of ``--points`` points (tracks of 2-8 consecutive cameras, observations = projections
plus 0.5 px noise), ``--unregistered`` extra images that match nothing well, the matching
``database.db`` (keypoints, raw matches with outliers, verified inliers of pairs (i, i+1..5))
and image files (symlinks to a few 1600x1200 JPEGs, so thumbnails cost a real decode). Then
times ``dift_sfm.report.write_sfm_report`` on it and reports the file size and its parts.

    python benchmarks/bench_report.py --images 1000 --points 500000 --out /tmp/bench_report

The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pycolmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dift_sfm.report import write_sfm_report  # noqa: E402

W, H, F = 1600, 1200, 1400.0


def _texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.float32)
    for cells in (8, 32, 128, 400):
        img += cv2.resize(rng.random((cells * 3 // 4, cells, 3)).astype(np.float32), (W, H),
                          interpolation=cv2.INTER_CUBIC)
    return np.clip(img / img.max() * 255, 0, 255).astype(np.uint8)


def build(out: Path, num_images: int, num_points: int, num_unregistered: int,
          seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    images = out / "images"
    images.mkdir(parents=True)
    bases = []
    for k in range(6):
        path = out / f"base{k}.jpg"
        cv2.imwrite(str(path), _texture(k), [cv2.IMWRITE_JPEG_QUALITY, 90])
        bases.append(path)
    names = [f"img_{i:05d}.jpg" for i in range(num_images + num_unregistered)]
    for i, n in enumerate(names):
        (images / n).symlink_to(bases[i % len(bases)])

    # cameras on a ring of radius 10 (z = 1.5) looking at the axis; points on a cylinder r=3
    K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]])
    ang = 2 * np.pi * np.arange(num_images) / num_images
    centres = np.c_[10 * np.cos(ang), 10 * np.sin(ang), np.full(num_images, 1.5)]
    Rs = []
    for c in centres:
        fwd = np.array([-c[0], -c[1], 0.0]) / np.hypot(c[0], c[1])
        right = np.cross(fwd, [0, 0, 1.0])
        Rs.append(np.stack([right, np.cross(fwd, right), fwd]))
    Rs = np.asarray(Rs)
    home = rng.integers(0, num_images, num_points)
    length = rng.integers(2, 9, num_points)
    # a point seen by cameras home..home+len-1: put it on the cylinder facing them
    a = ang[home] + np.pi / num_images * (length - 1) + rng.normal(0, 0.05, num_points)
    xyz = np.c_[3 * np.cos(a), 3 * np.sin(a), rng.uniform(0, 3, num_points)]
    obs: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(num_images)]
    tracks = []
    for p in range(num_points):
        track = []
        for j in range(length[p]):
            cam = (home[p] + j) % num_images
            x = Rs[cam] @ (xyz[p] - centres[cam])
            uv = K[:2, :2] @ (x[:2] / x[2]) + K[:2, 2] + rng.normal(0, 0.5, 2)
            track.append((cam, len(obs[cam])))
            obs[cam].append(uv)
        tracks.append(track)

    rec = pycolmap.Reconstruction()
    camera = pycolmap.Camera(model="PINHOLE", width=W, height=H, params=[F, F, W / 2, H / 2],
                             camera_id=1)
    rec.add_camera_with_trivial_rig(camera)
    for i in range(num_images):
        kps = np.asarray(obs[i], float).reshape(-1, 2)
        image = pycolmap.Image(name=names[i], keypoints=kps + 0.5, camera_id=1, image_id=i + 1)
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(Rs[i]), -Rs[i] @ centres[i])
        rec.add_image_with_trivial_frame(image, pose)
    colours = rng.integers(0, 256, (num_points, 3)).astype(np.uint8)
    for p, track in enumerate(tracks):
        rec.add_point3D(xyz[p], pycolmap.Track([pycolmap.TrackElement(c + 1, k)
                                                for c, k in track]), colours[p])
    rec.update_point_3d_errors()
    (out / "sparse" / "0").mkdir(parents=True)
    rec.write_binary(out / "sparse" / "0")

    # database: keypoints, raw matches (+20% outliers) and inliers of pairs (i, i + 1..5)
    point_of = [np.full(len(o), -1, np.int64) for o in obs]
    for p, track in enumerate(tracks):
        for c, k in track:
            point_of[c][k] = p
    with pycolmap.Database.open(out / "database.db") as db, pycolmap.DatabaseTransaction(db):
        db.write_camera(camera, use_camera_id=True)
        for i, n in enumerate(names):
            kps = (np.asarray(obs[i], np.float32).reshape(-1, 2) if i < num_images
                   else rng.uniform(0, [W, H], (500, 2)).astype(np.float32))
            db.write_image(pycolmap.Image(name=n, camera_id=1, image_id=i + 1), use_image_id=True)
            db.write_keypoints(i + 1, kps + 0.5)
            if i >= num_images:
                point_of.append(np.full(500, -1, np.int64))
        for i in range(num_images):
            for d in range(1, 6):
                j = (i + d) % num_images
                common, ia, ib = np.intersect1d(point_of[i], point_of[j], return_indices=True)
                keep = common >= 0
                inl = np.c_[ia[keep], ib[keep]].astype(np.uint32)
                out_n = len(inl) // 5
                bad = np.c_[rng.integers(0, len(point_of[i]), out_n),
                            rng.integers(0, len(point_of[j]), out_n)].astype(np.uint32)
                db.write_matches(i + 1, j + 1, np.r_[inl, bad])
                tvg = pycolmap.TwoViewGeometry()
                tvg.config = pycolmap.TwoViewGeometryConfiguration.CALIBRATED
                tvg.inlier_matches = inl
                db.write_two_view_geometry(i + 1, j + 1, tvg)
        for u in range(num_unregistered):
            i = num_images + u
            for j in rng.choice(num_images, 3, replace=False):
                m = np.c_[rng.integers(0, 500, 20), rng.integers(0, len(point_of[j]), 20)]
                db.write_matches(i + 1, int(j) + 1, m.astype(np.uint32))
    return {"registered": num_images, "points": num_points,
            "observations": int(sum(len(o) for o in obs)), "unregistered": num_unregistered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--points", type=int, default=500_000)
    parser.add_argument("--unregistered", type=int, default=20)
    parser.add_argument("--max-points", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_report"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep the model of an earlier run in --out (same arguments)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.reuse and (args.out / "sparse" / "0" / "points3D.bin").is_file():
        info = {"registered": args.images, "points": args.points,
                "unregistered": args.unregistered}
    else:
        info = build(args.out, args.images, args.points, args.unregistered)
    build_s = time.perf_counter() - t0
    print(json.dumps({"stage": "synthetic model built", "seconds": round(build_s, 1), **info}),
          flush=True)
    t0 = time.perf_counter()
    path = write_sfm_report(args.out, image_dir=args.out / "images", max_points=args.max_points)
    report_s = time.perf_counter() - t0
    html = path.read_text()
    plotly_js = len(html[html.index("<script>", html.index("</script>") + 1):
                         html.index("</head>")])
    thumbs = html.count("data:image/jpeg;base64,")
    print(json.dumps({
        "bench": "report", **info, "max_points": args.max_points,
        "build_model_s": round(build_s, 1), "report_s": round(report_s, 1),
        "report_mb": round(path.stat().st_size / 1e6, 2), "plotly_js_mb": round(plotly_js / 1e6, 2),
        "thumbnails": thumbs, "pairs_drawn": html.count("<figure class=pair "),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    main()
