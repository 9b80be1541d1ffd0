"""Image preparation cost per image per core (decode, resize, detect), before/after, and the
cores one GPU needs; with ``--memory``, the peak memory of `dift-sfm extract` on big photos.

Stages, one thread (OpenCV single-threaded), best of ``--repeats`` per image, median over the
images of each size:
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
    """Seconds of each stage for one image, and the number of keypoints."""
    pre = conf["preprocessing"]
    t0 = time.perf_counter()
    data = path.read_bytes()
    if landed:
        image = landed_decode(data)
    else:
        plan = plan_preparation(read_header(data), conf)
        image = decode_image(data, path, plan.reduce)
    t1 = time.perf_counter()
    described, _ = resize_image(image, pre["resize_max"])
    detected, _ = resize_image(described, pre["detect_max"])
    t2 = time.perf_counter()
    kpts = detect_keypoints(detected, conf["keypoints"])
    t3 = time.perf_counter()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="megapixels (default 1 12 24; with --memory 12 24 48 108)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-img-per-s", type=float, default=11.0)
    parser.add_argument("--memory", action="store_true", help="peak RSS of `dift-sfm extract`")
    parser.add_argument("--landed-sizes", type=int, nargs="*", default=[12],
                        help="with --memory: sizes also run with the landed dift-sd settings "
                             "(full-resolution DoG: ~6 GB at 24 MP, ~24 GB at 108 MP)")
    parser.add_argument("--tmp", default=None, help="folder for the synthetic JPEGs")
    args = parser.parse_args()
    if args.sizes is None:
        args.sizes = [12, 24, 48, 108] if args.memory else [1, 12, 24]
    results = run_memory(args) if args.memory else run_costs(args)
    print(json.dumps({
        "benchmark": "prepare_memory" if args.memory else "prepare_costs",
        "results": results, "gpu_img_per_s": args.gpu_img_per_s,
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "load": os.getloadavg(), "date": datetime.date.today().isoformat(),
        "self_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
