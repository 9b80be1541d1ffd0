"""Scale benchmark of the back end: h5 files -> COLMAP database -> verification -> mappers.

A synthetic aerial survey with known geometry, as large as ``--images N``:

- scene: cameras on a sqrt(N) x sqrt(N) grid (spacing 1 unit, altitude ~3, random yaw, tilt
  up to 8 deg), 640x480, focal 768 px (COLMAP's default guess 1.2 * 640, so the database's
  initial intrinsics are right); 3D points over the whole area (``--density`` per unit^2) on
  a bumpy terrain (height variation ~1 unit: real parallax).
- features: each camera's keypoints are the projections of the points it sees plus Gaussian
  noise (``--noise`` px), 10 % of them missed, plus 15 % random distractors, shuffled;
  8-D float16 stand-in descriptors (the back end never reads them).
- pairs: retrieval-style, each image with its ``--neighbors`` nearest cameras plus, for 3 %
  of the images, one random far image (a retrieval mistake with no true match).
- matches: the points both images of a pair see (90 % recall) plus 15 % outliers (random
  keypoints); the far pairs only get random matches.

Written through dift_sfm's own writers (``formats.h5store.ShardedH5Writer``,
``formats.features.feature_datasets``, ``formats.matches.match_datasets``), then the steps of
``dift-sfm reconstruct``: ``colmap.database.create_database`` (pycolmap's image reader on
blank 640x480 JPEGs), ``import_into_database``, ``colmap.mapping.verify_database`` and
``run_mapping`` with each mapper (on its own copy of the verified database).

Reported per stage: wall time, CPU time (all threads) and peak RSS of the process during the
stage (sampled every 10 ms); per mapper: registered images, points, reprojection error, and
the pose error after a similarity alignment of the camera centres to the truth (Umeyama):
median / 90th percentile rotation error (deg) and position error (units; grid spacing 1).
Last line: JSON.

    python benchmarks/bench_scale.py --images 1000 [--mappers incremental,global,hierarchical]
        [--output outputs/bench_scale] [--density 150] [--neighbors 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pycolmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dift_sfm.colmap.database import create_database, import_into_database  # noqa: E402
from dift_sfm.colmap.mapping import follow_log_level, run_mapping, verify_database  # noqa: E402
from dift_sfm.formats.features import (  # noqa: E402
    FeaturesReader,
    feature_datasets,
    is_complete_features,
)
from dift_sfm.formats.h5store import ShardedH5Writer  # noqa: E402
from dift_sfm.formats.matches import (  # noqa: E402
    is_complete_matches,
    match_attrs,
    match_datasets,
    pair_key,
)
from dift_sfm.pairs import read_pairs, write_pairs  # noqa: E402

W, H = 640, 480
FOCAL = 1.2 * max(W, H)
K = np.array([[FOCAL, 0, W / 2], [0, FOCAL, H / 2], [0, 0, 1]])  # COLMAP pixel convention
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# --------------------------------------------------------------------------- measuring
class PeakRSS:
    """Samples this process's resident memory every ``interval`` s in a daemon thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak


STAGES: dict[str, dict] = {}


def _cpu() -> float:
    """CPU seconds of this process, all threads (user + system): less load-dependent than
    wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def stage(name: str, rss: PeakRSS, **extra):
    start_rss = rss.reset()
    t0, c0 = time.perf_counter(), _cpu()
    row = {"name": name, **extra}
    try:
        yield row
    finally:
        row["seconds"] = time.perf_counter() - t0
        row["cpu_s"] = _cpu() - c0
        row["peak_rss_mb"] = max(rss.peak, rss.now()) / 2**20
        row["rss_growth_mb"] = (max(rss.peak, rss.now()) - start_rss) / 2**20
        STAGES[name] = row
        print(f"  {name:22s} {row['seconds']:8.2f} s  cpu {row['cpu_s']:8.2f} s  peak RSS "
              f"{row['peak_rss_mb']:7.0f} MB (+{row['rss_growth_mb']:.0f})", flush=True)


# --------------------------------------------------------------------------- scene
def rotation(yaw: float, tilt_x: float, tilt_y: float) -> np.ndarray:
    """cam_from_world rotation of a camera looking down (-z world) with yaw and tilts (rad)."""
    down = np.diag([1.0, -1.0, -1.0])  # camera z (forward) = world -z, camera y = world -y
    cz, sz = math.cos(yaw), math.sin(yaw)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    cx, sx = math.cos(tilt_x), math.sin(tilt_x)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    cy, sy = math.cos(tilt_y), math.sin(tilt_y)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rx @ ry @ down @ rz


def make_scene(n: int, density: float, rng: np.random.Generator) -> dict:
    side = math.ceil(math.sqrt(n))
    idx = np.arange(n)
    centres = np.stack([idx % side, idx // side, np.full(n, 3.0)], 1).astype(np.float64)
    centres += rng.normal(0, 0.1, centres.shape)
    rots = np.stack([rotation(rng.uniform(0, 2 * np.pi), *np.radians(rng.uniform(-8, 8, 2)))
                     for _ in range(n)])
    lo, hi = -1.5, side + 0.5
    m = int(density * (hi - lo) ** 2)
    xy = rng.uniform(lo, hi, (m, 2))
    z = (0.4 * np.sin(1.3 * xy[:, 0]) * np.cos(0.9 * xy[:, 1]) + rng.uniform(-0.3, 0.3, m))
    points = np.concatenate([xy, z[:, None]], 1)
    return {"centres": centres, "rots": rots, "points": points, "side": side}


def observe(scene: dict, noise: float, rng: np.random.Generator) -> list[dict]:
    """Per camera: keypoints (N, 2) hloc pixels (centres at integers) and point id per
    keypoint (-1: distractor)."""
    pts = scene["points"]
    cells: dict[tuple[int, int], np.ndarray] = {}
    keys = np.floor(pts[:, :2]).astype(np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    uniq, starts = np.unique(keys[order], axis=0, return_index=True)
    for (cx, cy), a, b in zip(uniq, starts, [*starts[1:], len(order)], strict=True):
        cells[(int(cx), int(cy))] = order[a:b]
    views = []
    for c, r in zip(scene["centres"], scene["rots"], strict=True):
        gx, gy = int(math.floor(c[0])), int(math.floor(c[1]))
        near = [cells[k] for k in ((gx + dx, gy + dy) for dx in range(-3, 4)
                                   for dy in range(-3, 4)) if k in cells]
        ids = np.concatenate(near) if near else np.zeros(0, np.int64)
        cam = (pts[ids] - c) @ r.T
        front = cam[:, 2] > 0.1
        ids, cam = ids[front], cam[front]
        uv = cam @ K.T
        uv = uv[:, :2] / uv[:, 2:]
        inside = (uv[:, 0] > 1) & (uv[:, 0] < W - 1) & (uv[:, 1] > 1) & (uv[:, 1] < H - 1)
        ids, uv = ids[inside], uv[inside]
        seen = rng.random(len(ids)) > 0.1
        ids, uv = ids[seen], uv[seen] + rng.normal(0, noise, (seen.sum(), 2))
        nd = int(0.15 * len(ids))
        uv = np.concatenate([uv, rng.uniform([1, 1], [W - 1, H - 1], (nd, 2))])
        ids = np.concatenate([ids, np.full(nd, -1)])
        perm = rng.permutation(len(ids))
        uv = np.clip(uv[perm], 0.5, [W - 0.5, H - 0.5]) - 0.5  # COLMAP -> hloc convention
        views.append({"kpts": uv.astype(np.float32), "ids": ids[perm]})
    return views


def retrieval_pairs(scene: dict, k: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    c = scene["centres"][:, :2]
    n = len(c)
    pairs = set()
    for i in range(n):
        d = np.linalg.norm(c - c[i], axis=1)
        for j in np.argsort(d)[1:k + 1]:
            pairs.add((min(i, int(j)), max(i, int(j))))
    for i in rng.choice(n, max(1, int(0.03 * n)), replace=False):
        j = int(rng.integers(n))
        if np.linalg.norm(c[i] - c[j]) > 6:
            pairs.add((min(int(i), j), max(int(i), j)))
    return sorted(pairs)


def pair_matches(v0: dict, v1: dict, far: bool, rng: np.random.Generator) -> np.ndarray:
    """matches0 (N0,) int32: index into v1's keypoints or -1."""
    n0, n1 = len(v0["ids"]), len(v1["ids"])
    m0 = np.full(n0, -1, np.int32)
    if not far:
        common, i0, i1 = np.intersect1d(v0["ids"], v1["ids"], return_indices=True)
        keep = (common >= 0) & (rng.random(len(common)) < 0.9)
        m0[i0[keep]] = i1[keep]
    n_true = int((m0 >= 0).sum())
    free0 = np.flatnonzero(m0 < 0)
    free1 = np.setdiff1d(np.arange(n1), m0[m0 >= 0])
    n_out = min(max(30, int(0.15 * n_true)) if far else int(0.15 * n_true),
                len(free0), len(free1))
    if n_out:
        m0[rng.choice(free0, n_out, replace=False)] = rng.choice(free1, n_out, replace=False)
    return m0


# --------------------------------------------------------------------------- pose error
def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising ||dst - (s R src + t)|| over (M, 3) point sets."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    r = u @ sign @ vt
    s = float(np.trace(np.diag(sig) @ sign) / xs.var(0).sum())
    return s, r, mu_d - s * r @ mu_s


def pose_errors(rec: pycolmap.Reconstruction, scene: dict, names: list[str]) -> dict:
    index = {n: i for i, n in enumerate(names)}
    est_c, gt_c, est_r, gt_r = [], [], [], []
    for image_id in rec.reg_image_ids():
        im = rec.images[image_id]
        pose = im.cam_from_world()
        r = pose.rotation.matrix()
        est_r.append(r)
        est_c.append(-r.T @ pose.translation)
        i = index[im.name]
        gt_r.append(scene["rots"][i])
        gt_c.append(scene["centres"][i])
    est_c, gt_c = np.array(est_c), np.array(gt_c)
    if len(est_c) < 3:
        return {"registered": len(est_c)}
    s, r_a, t_a = umeyama(est_c, gt_c)  # gt ~ s R est + t
    pos = np.linalg.norm((s * est_c @ r_a.T + t_a) - gt_c, axis=1)
    rot = []
    for re_, rg in zip(est_r, gt_r, strict=True):
        # est world = R_a^T (gt world - t) / s: cam_from_gt_world rotation = re_ R_a^T
        d = re_ @ r_a.T @ rg.T
        rot.append(math.degrees(math.acos(np.clip((np.trace(d) - 1) / 2, -1, 1))))
    rot = np.array(rot)
    return {"registered": len(est_c), "rot_err_deg_median": float(np.median(rot)),
            "rot_err_deg_p90": float(np.percentile(rot, 90)),
            "pos_err_median": float(np.median(pos)), "pos_err_p90": float(np.percentile(pos, 90))}


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--mappers", default="incremental,global,hierarchical")
    p.add_argument("--output", type=Path, default=Path("outputs/bench_scale"))
    p.add_argument("--density", type=float, default=150.0, help="3D points per unit^2")
    p.add_argument("--neighbors", type=int, default=8, help="retrieval pairs per image")
    p.add_argument("--noise", type=float, default=0.5, help="keypoint noise, px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-from", type=Path, default=None, metavar="DIR",
                   help="only map: the verified database of an earlier run with the same "
                        "--images/--seed/--density in DIR (its sfm folders are not touched)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dift_sfm").setLevel(logging.WARNING)
    follow_log_level()
    out = args.output
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    rss = PeakRSS()
    n = args.images
    names = [f"img{i:06d}.jpg" for i in range(n)]
    print(f"Synthetic survey of {n} images:")

    if args.reuse_from is not None:  # map the verified database of an earlier run
        with stage("scene", rss):
            scene = make_scene(n, args.density, rng)  # the first draws: the same scene
        database, images = args.reuse_from / "database.db", args.reuse_from / "images"
        if not database.is_file():
            sys.exit(f"No database.db in {args.reuse_from}.")
        pairs = read_pairs(args.reuse_from / "pairs.txt")
    else:
        with stage("scene", rss) as row:  # generating the data: not part of the back end
            scene = make_scene(n, args.density, rng)
            views = observe(scene, args.noise, rng)
            pairs = retrieval_pairs(scene, args.neighbors, rng)
            far = {(i, j) for i, j in pairs
                   if np.linalg.norm(scene["centres"][i, :2] - scene["centres"][j, :2]) > 6}
            raw = [pair_matches(views[i], views[j], (i, j) in far, rng) for i, j in pairs]
            row.update(points=len(scene["points"]), pairs=len(pairs), far_pairs=len(far),
                       keypoints_per_image=float(np.mean([len(v["ids"]) for v in views])),
                       raw_matches=int(sum((m >= 0).sum() for m in raw)))

        with stage("images", rss):  # blank JPEGs: pycolmap's image reader needs real files
            images = out / "images"
            images.mkdir()
            cv2.imwrite(str(images / names[0]), np.full((H, W, 3), 127, np.uint8))
            for name in names[1:]:
                os.link(images / names[0], images / name)

        features = out / "features.h5"
        with stage("write_features", rss):
            writer = ShardedH5Writer(features, is_complete_features, {"conf": "synthetic"},
                                     shard_entries=4096)
            desc_rng = np.random.default_rng(1)
            for name, v in zip(names, views, strict=True):
                desc = desc_rng.standard_normal((len(v["ids"]), 8)).astype(np.float32)
                desc /= np.linalg.norm(desc, axis=1, keepdims=True)
                writer.write(name, feature_datasets(v["kpts"], desc, np.ones(len(v["ids"])),
                                                    (W, H), as_half=True))
            writer.finalize()
        pairs_path = out / "pairs.txt"
        write_pairs(pairs_path, [(names[i], names[j]) for i, j in pairs])

        matches = out / "matches.h5"
        with stage("write_matches", rss):
            with FeaturesReader(features) as f:
                prints = [f.fingerprint(name) for name in names]
            writer = ShardedH5Writer(matches, is_complete_matches, {"conf": "synthetic"},
                                     shard_entries=4096)
            for (i, j), m0 in zip(pairs, raw, strict=True):
                writer.write(pair_key(names[i], names[j]),
                             match_datasets(m0, (m0 >= 0).astype(np.float32)),
                             match_attrs(prints[i], prints[j]))
            writer.finalize()

        database = out / "database.db"
        with stage("database", rss):
            create_database(database, images, names, camera_mode="single")
        with stage("import", rss):
            import_into_database(database, features, matches, pairs_path)
        with stage("verification", rss) as row:
            row["verified_pairs"] = verify_database(database)

    results = {}
    for mapper in [m for m in args.mappers.split(",") if m]:
        sfm = out / f"sfm-{mapper}"
        sfm.mkdir()
        db = sfm / "database.db"
        shutil.copy(database, db)
        with stage(f"mapping_{mapper}", rss) as row:
            try:
                models = run_mapping(db, images, sfm, mapper=mapper)
            except Exception as err:  # report and go on with the next mapper
                row["error"] = str(err)
                models = []
        if models:
            rec = models[0]
            row.update(models=len(models), points3D=rec.num_points3D(),
                       reproj_px=float(rec.compute_mean_reprojection_error()),
                       **pose_errors(rec, scene, names))
        results[mapper] = row
        print(f"    {mapper}: {json.dumps({k: v for k, v in row.items() if k != 'name'})}")

    num_pairs = len(pairs)
    units = {"write_features": n, "write_matches": num_pairs, "database": n,
             "import": num_pairs, "verification": num_pairs,
             **{f"mapping_{m}": n for m in results}}
    units = {k: v for k, v in units.items() if k in STAGES}
    per = {}
    for key, count in units.items():
        unit = "image" if count == n else "pair"
        per[f"{key}_ms_per_{unit}"] = 1e3 * STAGES[key]["seconds"] / count
        per[f"{key}_cpu_ms_per_{unit}"] = 1e3 * STAGES[key]["cpu_s"] / count
    for key, value in per.items():
        print(f"  {key:34s} {value:9.2f}")
    print(json.dumps({"bench": "scale", "images": n, "pairs": num_pairs,
                      "stages": list(STAGES.values()), "per_unit": per}))


if __name__ == "__main__":
    main()
