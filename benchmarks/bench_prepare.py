"""Image preparation cost per image per core (decode, resize, detect), before/after, and the
cores one GPU needs; with ``--memory``, the peak memory of `dift-sfm extract` on big photos.

Stages, one thread (OpenCV single-threaded), CPU time of that thread (``time.thread_time``),
best of ``--repeats`` per image, median over the images of each size:
- ``decode``: file bytes -> float32 RGB (the header read and plan included, after);
- ``resize``: ``resize_max`` (the featurizer's image), then ``detect_max`` (the detector's);
- ``detect``: DoG at the detector's size (``keypoints.max_keypoints`` 4096).
Rows: ``dift-sd`` as landed at e232955 (full-size decode, DoG at full resolution: the
settings ``detect_max=null, reduced_decode=null`` and the decode of that commit) and as
now (its default conf), ``sift`` (unchanged: OpenCV-exact). The "after" row also runs the
real ``extract.prepare`` and checks its keypoints equal the staged ones.

Images: 1 MP (``../shared/data/sacre_coeur``), 12 MP (``../shared/data/photos_12mp``, 4032x3024
phone JPEGs), 24 MP (those photos resized to 5664x4248, JPEG q95, written to a temporary
folder: fewer fine details than a real 24 MP photo, so DoG finds fewer extrema there).

``cores_per_gpu`` = core-seconds per image x the featurizer's rate (``--gpu-img-per-s``,
default 11: DIFT-SD alone on an H200, docs/benchmarks.md).

    python benchmarks/bench_prepare.py                      # a few minutes on 2 cores
    python benchmarks/bench_prepare.py --memory --sizes 12 24 48 108
    python benchmarks/bench_prepare.py --quality

``--quality``: what bounded detection does to the keypoints (weight-free): repeatability
(share of keypoints, in the part both images see, with a keypoint of the other image within
3 px once warped by the ground-truth homography) and localisation error (mean distance of
those) of full-resolution OpenCV DoG (the DIFT confs at e232955) against the new detection,
4096 keypoints, on the shared HPatches and Oxford pairs and on the 12 MP photos warped by
random homographies (JPEG q95). The shared pairs are at most 1000 px, where the DIFT confs'
detect_max=1600 changes nothing (checked); so they are also run at
``detect_max = long side / 2.52``, the reduction 4032 -> 1600 px of a 12 MP photo.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dift_sfm.confs import get_conf  # noqa: E402
from dift_sfm.extract import plan_preparation, prepare  # noqa: E402
from dift_sfm.images import decode_image, read_header, resize_image  # noqa: E402
from dift_sfm.keypoints import detect_keypoints  # noqa: E402

DATA = REPO.parent / "shared" / "data"
LANDED = {"preprocessing.detect_max": None, "preprocessing.reduced_decode": None}


def landed_decode(data: bytes) -> np.ndarray:
    """read_image's decode as landed at e232955 (float copy, then a BGR -> RGB copy)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8),
                         cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    image = image.astype(np.float32) / 255.0
    return np.ascontiguousarray(image[..., 2::-1])


def staged(path: Path, conf: dict, landed: bool) -> tuple[dict[str, float], int]:
    """CPU seconds of this thread in each stage for one image (so a loaded machine inflates
    them far less than wall time), and the number of keypoints."""
    pre = conf["preprocessing"]
    clock = time.thread_time
    t0 = clock()
    data = path.read_bytes()
    if landed:
        image = landed_decode(data)
    else:
        plan = plan_preparation(read_header(data), conf)
        image = decode_image(data, path, plan.reduce)
    t1 = clock()
    described, _ = resize_image(image, pre["resize_max"])
    detected, _ = resize_image(described, pre["detect_max"])
    t2 = clock()
    kpts = detect_keypoints(detected, conf["keypoints"])
    t3 = clock()
    return {"decode": t1 - t0, "resize": t2 - t1, "detect": t3 - t2}, len(kpts)


def photos(size_mp: int, tmp: Path) -> list[Path]:
    """A few photos of about ``size_mp`` megapixels (see the module docstring)."""
    twelve = sorted((DATA / "photos_12mp").glob("*.JPG"))
    if size_mp == 1:
        return sorted((DATA / "sacre_coeur").glob("*.jpg"))[:3]
    if size_mp == 12:
        return twelve[:3]
    w = int(round((size_mp * 1e6 * 4 / 3) ** 0.5 / 8)) * 8
    h = w * 3 // 4
    out = []
    for i, src in enumerate(twelve[:2]):
        dst = tmp / f"photo_{size_mp}mp_{i}.jpg"
        if not dst.exists():
            img = cv2.imread(str(src), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            cv2.imwrite(str(dst), cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
        out.append(dst)
    return out


def run_costs(args: argparse.Namespace) -> dict:
    cv2.setNumThreads(1)
    rows = {"dift-sd e232955": get_conf("dift-sd", LANDED), "dift-sd": get_conf("dift-sd"),
            "sift": get_conf("sift")}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            paths = photos(size, Path(tmp))
            if not paths:
                print(f"no {size} MP photos under {DATA}: skipped", file=sys.stderr)
                continue
            for label, conf in rows.items():
                per_image = []
                for p in paths:
                    runs = [staged(p, conf, label.endswith("e232955"))
                            for _ in range(args.repeats)]
                    best = {k: min(r[0][k] for r in runs) for k in runs[0][0]}
                    per_image.append((best, runs[0][1]))
                    if label == "dift-sd":  # the real step gives the staged keypoints
                        got = prepare(p, conf, p.name)
                        assert len(got.keypoints) == runs[0][1], (p, len(got.keypoints))
                stages = {k: statistics.median(b[k] for b, _ in per_image)
                          for k in per_image[0][0]}
                total = sum(stages.values())
                w, h = read_header(paths[0].read_bytes()).size
                plan = plan_preparation(read_header(paths[0].read_bytes()), conf)
                rec = {"size": f"{w}x{h}", "images": len(paths),
                       **{f"{k}_s": round(v, 3) for k, v in stages.items()},
                       "total_core_s": round(total, 3),
                       "keypoints": int(statistics.median(n for _, n in per_image)),
                       "plan": plan.summary(), "est_peak_mib": round(plan.peak_bytes / 2**20),
                       "cores_per_gpu": round(total * args.gpu_img_per_s, 1)}
                results[f"{label} @ {size} MP"] = rec
                print(json.dumps({"row": f"{label} @ {size} MP", **rec}), flush=True)
    return results


def peak_rss_of(cmd: list[str], env: dict) -> tuple[int, float, int, str]:
    """(exit code, seconds, peak RSS bytes, last stderr line) of a child process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
    return (proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024,
            lines[-1] if lines else "")


def run_memory(args: argparse.Namespace) -> dict:
    """Peak RSS of `dift-sfm extract` on one synthetic JPEG per size, sift and dift-sd (the
    tiny conformance model, img_size [256, 256], as issue 18 measured)."""
    model = REPO.parent / "shared" / "conformance" / "sd" / "model"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE")
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for size in args.sizes:
            w = int(round((size * 1e6 * 4 / 3) ** 0.5 / 8)) * 8
            h = w * 3 // 4
            folder = tmp / f"{size}mp"
            folder.mkdir()
            small = (rng.random((h // 16, w // 16, 3)) * 255).astype(np.uint8)
            img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
            img += rng.integers(0, 12, img.shape, dtype=np.uint8)  # fine detail for DoG
            cv2.imwrite(str(folder / "big.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            del img, small
            runs = [("sift", []), ("dift-sd", ["--model", str(model), "--set",
                                               "featurizer.img_size=[256,256]", "--set",
                                               "featurizer.ensemble=1", "--device", "cpu"])]
            if size in args.landed_sizes:
                runs.append(("dift-sd e232955", runs[1][1] + [
                    "--set", "preprocessing.detect_max=null", "--set",
                    "preprocessing.reduced_decode=null", "--set", "preprocessing.memory_mb=null"]))
            for label, extra in runs:
                conf = label.split()[0]
                cmd = [sys.executable, "-m", "dift_sfm.cli", "extract", str(folder), "-o",
                       str(tmp / f"{size}-{label.replace(' ', '_')}.h5"), "--conf", conf,
                       "--overwrite", *extra]
                rc, secs, peak, last = peak_rss_of(cmd, env)
                rec = {"size": f"{w}x{h}", "rc": rc, "s": round(secs, 1),
                       "peak_rss_mib": round(peak / 2**20), "stderr_last": last[-200:]}
                results[f"{label} @ {size} MP"] = rec
                print(json.dumps({"row": f"{label} @ {size} MP", **rec}), flush=True)
            (folder / "big.jpg").unlink()
    return results


def nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point of ``a`` (N, 2): distance to, and index of, the nearest of ``b``."""
    if not len(b):
        return np.full(len(a), np.inf), np.zeros(len(a), int)
    dist, idx = np.empty(len(a)), np.empty(len(a), int)
    for i in range(0, len(a), 1024):
        d = ((a[i:i + 1024, None, :] - b[None]) ** 2).sum(-1)
        idx[i:i + 1024] = d.argmin(1)
        dist[i:i + 1024] = np.sqrt(d[np.arange(len(d)), idx[i:i + 1024]])
    return dist, idx


def repeatability(k0: np.ndarray, k1: np.ndarray, H: np.ndarray, size0: tuple[int, int],
                  size1: tuple[int, int], eps: float = 3.0) -> tuple[float, float]:
    """(repeatability, mean localisation error px) of keypoints k0 (image 0) and k1 (image 1)
    under H (image-0 to image-1 pixels): mutual nearest neighbours within ``eps`` px, in image
    1, among the keypoints both images see, over the smaller of the two counts."""
    from dift_sfm.geometry import warp_points

    def inside(p: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return ((p[:, 0] >= -0.5) & (p[:, 0] <= size[0] - 0.5) & (p[:, 1] >= -0.5)
                & (p[:, 1] <= size[1] - 0.5))

    w0 = warp_points(H, k0)
    w1 = warp_points(np.linalg.inv(H), k1)
    a, b = w0[inside(w0, size1)], k1[inside(w1, size0)]
    if not len(a) or not len(b):
        return 0.0, float("nan")
    d, ab = nearest(a, b)
    _, ba = nearest(b, a)
    hit = (d < eps) & (ba[ab] == np.arange(len(a)))
    return float(hit.sum() / min(len(a), len(b))), float(d[hit].mean()) if hit.any() else 0.0


def warped_12mp_pairs(tmp: Path) -> list[tuple[Path, Path, np.ndarray]]:
    """Each 12 MP photo and a copy warped by a random homography (seeded), JPEG q95."""
    rng = np.random.default_rng(0)
    pairs = []
    for i, src in enumerate(sorted((DATA / "photos_12mp").glob("*.JPG"))[:args_n_photos]):
        img = cv2.imread(str(src), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        h, w = img.shape[:2]
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
        moved = corners + rng.uniform(-0.12, 0.12, (4, 2)).astype(np.float32) * [w, h]
        centre = np.array([w / 2, h / 2], np.float32)
        moved = (moved - centre) * rng.uniform(0.8, 1.1) + centre
        # warpPerspective works in pixel-centre coordinates: H maps image-0 to image-1 pixels
        H = cv2.getPerspectiveTransform((corners - 0.5).astype(np.float32),
                                        (moved - 0.5).astype(np.float32)).astype(np.float64)
        dst = tmp / f"warped_{i}.jpg"
        cv2.imwrite(str(dst), cv2.warpPerspective(img, H, (w, h), flags=cv2.INTER_LINEAR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        pairs.append((src, dst, H))
    return pairs


args_n_photos = 3


def run_quality(args: argparse.Namespace) -> dict:
    from dift_sfm.eval.datasets import common_base, find_sequences, homography_pairs

    cv2.setNumThreads(max(1, os.cpu_count() or 1))

    def detect(path: Path, conf: dict) -> tuple[np.ndarray, tuple[int, int]]:
        got = prepare(path, conf, path.name)
        return got.keypoints.xy.astype(np.float64), got.image_size

    landed, new = get_conf("dift-sd", LANDED), get_conf("dift-sd")
    sets: dict[str, list[tuple[Path, Path, np.ndarray]]] = {}
    for label, root in (("hpatches", DATA / "hpatches"), ("oxford", DATA / "oxford_affine")):
        if root.is_dir():
            seqs = find_sequences(root)
            base = common_base(seqs)
            sets[label] = [(base / p.name0, base / p.name1, p.H) for p in homography_pairs(
                seqs, base)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if (DATA / "photos_12mp").is_dir():
            sets["photos_12mp warped"] = warped_12mp_pairs(Path(tmp))
        for label, pairs in sets.items():
            cache: dict[tuple[str, str], tuple[np.ndarray, tuple[int, int]]] = {}

            def kp(path: Path, variant: str, cache=cache) -> tuple[np.ndarray, tuple[int, int]]:
                key = (str(path), variant)
                if key not in cache:
                    size = read_header(path.read_bytes()).size
                    conf = {"full-res DoG (e232955)": landed, "dift-sd default": new}.get(
                        variant) or get_conf("dift-sd", {"preprocessing.detect_max":
                                                          round(max(size) / 2.52)})
                    cache[key] = detect(path, conf)
                return cache[key]

            variants = ["full-res DoG (e232955)", "dift-sd default"]
            if label != "photos_12mp warped":
                variants.append("detect_max = long side / 2.52")
            for variant in variants:
                reps, locs, counts, agree, offs = [], [], [], [], []
                for p0, p1, H in pairs:
                    (k0, s0), (k1, s1) = kp(p0, variant), kp(p1, variant)
                    rep, loc = repeatability(k0, k1, H, s0, s1)
                    reps.append(rep)
                    locs.append(loc)
                    counts.append((len(k0) + len(k1)) / 2)
                    ref = kp(p0, variants[0])[0]
                    d = nearest(k0, ref)[0]
                    agree.append(float((d < 2).mean()))
                    offs.append(float(np.median(d)))
                rec = {"pairs": len(pairs), "repeatability": round(float(np.mean(reps)), 3),
                       "loc_error_px": round(float(np.nanmean(locs)), 3),
                       "keypoints": round(float(np.mean(counts))),
                       "share_within_2px_of_full_res": round(float(np.mean(agree)), 3),
                       "median_dist_to_full_res_px": round(float(np.mean(offs)), 3)}
                results[f"{label}: {variant}"] = rec
                print(json.dumps({"row": f"{label}: {variant}", **rec}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="megapixels (default 1 12 24; with --memory 12 24 48 108)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-img-per-s", type=float, default=11.0)
    parser.add_argument("--memory", action="store_true", help="peak RSS of `dift-sfm extract`")
    parser.add_argument("--quality", action="store_true",
                        help="repeatability / localisation of bounded detection")
    parser.add_argument("--landed-sizes", type=int, nargs="*", default=[12],
                        help="with --memory: sizes also run with the landed dift-sd settings "
                             "(full-resolution DoG: ~6 GB at 24 MP, ~24 GB at 108 MP)")
    parser.add_argument("--tmp", default=None, help="folder for the synthetic JPEGs")
    args = parser.parse_args()
    if args.sizes is None:
        args.sizes = [12, 24, 48, 108] if args.memory else [1, 12, 24]
    mode = "quality" if args.quality else "memory" if args.memory else "costs"
    results = {"quality": run_quality, "memory": run_memory, "costs": run_costs}[mode](args)
    print(json.dumps({
        "benchmark": f"prepare_{mode}",
        "results": results, "gpu_img_per_s": args.gpu_img_per_s,
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "load": os.getloadavg(), "date": datetime.date.today().isoformat(),
        "self_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
