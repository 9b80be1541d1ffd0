"""Ray backends against the local ones: images/s and pairs/s per number of workers, Ray's own
overhead per image and per block, and the driver-side costs (shard writes, final merge).

    python benchmarks/bench_ray.py [--copies 2] [--pairs 60] [--workers 1 2] [--merge-entries 1000]
    python benchmarks/bench_ray.py --ceiling-only [--ceiling-entries 512] [--ceiling-dir DIR]

``--ceiling-only``: the driver's ceiling alone. Stand-in results (features of 4096 keypoints
x 128-D stored float32, 2 MiB, and of DIFT-SD's 640-D stored float16, 5 MiB, both handed over
as float32 descriptors; matches of 4096 keypoints, 32 KiB) are computed by Ray tasks
beforehand; then the driver receives them as the backends hand them over: one result per
image or pair, which it writes (``ShardedH5Writer.write``, the entry built by
``extract.feature_entry`` / ``match.match_entry``), or one piece per featurizer batch (8
images; DIFT-SD: 1, its default batch) or block of 64 pairs that the task packed
(``extract.pack_described`` / ``match.pack_matches``), which it stores
(``ShardedH5Writer.add_piece``); then ``finalize`` merges. Reported per entry: the receive
loop (what bounds the cluster while it runs), the merge, the resulting entries/s, and what
packing costs the task.

Images: ``--copies`` copies of ../shared/data/sacre_coeur (10 photos, about 1080x720) in a
temporary folder, ``sift`` conf. Throughput is steady state: the run's wall time minus the
backend's start-up (actors created, models loaded), which is reported on its own, as is the
local cluster's start. Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dift_sfm.confs import get_conf  # noqa: E402
from dift_sfm.distributed import (  # noqa: E402
    RayExtractBackend,
    RayMatchBackend,
    RayOptions,
    connect,
)
from dift_sfm.extract import (  # noqa: E402
    Described,
    Storage,
    extract_features,
    feature_entry,
    pack_described,
)
from dift_sfm.formats.features import feature_datasets, is_complete_features  # noqa: E402
from dift_sfm.formats.h5store import ShardedH5Writer  # noqa: E402
from dift_sfm.formats.matches import (  # noqa: E402
    is_complete_matches,
    match_datasets,
    pair_key,
)
from dift_sfm.keypoints import Keypoints  # noqa: E402
from dift_sfm.match import match_entry, match_features, pack_matches  # noqa: E402
from dift_sfm.pairs import exhaustive_pairs, write_pairs  # noqa: E402

logger = logging.getLogger("bench_ray")
SACRE = ROOT.parent / "shared" / "data" / "sacre_coeur"


def _images(folder: Path, copies: int) -> list[str]:
    folder.mkdir()
    names = []
    for c in range(copies):
        for src in sorted(SACRE.glob("*.jpg")):
            name = f"c{c}_{src.name}"
            shutil.copy(src, folder / name)
            names.append(name)
    return names


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ray_overhead(ray, repeats: int = 30) -> dict[str, float]:
    """Ray's own cost per image and per matching block, with no computation: the same
    objects as a real run (file bytes in, a resized float32 image between the prepare task
    and the actor, 4096 x 128 float32 descriptors back; two descriptor sets in per block)."""

    @ray.remote(num_cpus=1)
    def prepare(data: bytes) -> np.ndarray:
        return np.zeros((720, 1080, 3), np.float32)

    @ray.remote(num_cpus=1)
    class Worker:
        def describe(self, image: np.ndarray) -> np.ndarray:
            return np.zeros((4096, 128), np.float32)

        def match(self, d0: np.ndarray, d1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return np.zeros(len(d0), np.int32), np.zeros(len(d0), np.float32)

    worker = Worker.remote()
    data = os.urandom(450_000)  # a 1080x720 JPEG
    desc = np.zeros((4096, 128), np.float32)
    ray.get(worker.describe.remote(prepare.remote(data)))  # warm up
    per_image = _timed(lambda: [ray.get(worker.describe.remote(prepare.remote(data)))
                                for _ in range(repeats)]) / repeats
    per_block = _timed(lambda: [ray.get(worker.match.remote(ray.put(desc), ray.put(desc)))
                                for _ in range(repeats)]) / repeats
    ray.kill(worker)
    return {"ms_per_image": 1000 * per_image, "ms_per_block_2_images": 1000 * per_block}


def merge_cost(folder: Path, entries: int) -> dict[str, float]:
    """Driver-side h5 costs: ``entries`` writes to shards, then ShardedH5Writer.finalize."""
    rng = np.random.default_rng(0)
    kpts = rng.random((2048, 2), dtype=np.float32) * 1000
    desc = rng.standard_normal((2048, 128)).astype(np.float32)
    feats = feature_datasets(kpts, desc, np.ones(2048, np.float32), (1080, 720))
    size = sum(v.nbytes for v in feats.values())
    out: dict[str, float] = {"feature_entry_mb": size / 2**20}
    writer = ShardedH5Writer(folder / "feats.h5", is_complete_features)
    out["features_write_s"] = _timed(lambda: [writer.write(f"im{i:06d}.jpg", feats)
                                              for i in range(entries)])
    out["features_merge_s"] = _timed(writer.finalize)
    m = match_datasets(rng.integers(-1, 4096, 4096).astype(np.int32),
                       rng.random(4096, dtype=np.float32))
    out["match_entry_kb"] = sum(v.nbytes for v in m.values()) / 1024
    writer = ShardedH5Writer(folder / "matches.h5", is_complete_matches, shard_entries=256)
    out["matches_write_s"] = _timed(lambda: [writer.write(f"a{i:06d}.jpg/b.jpg", m)
                                             for i in range(entries)])
    out["matches_merge_s"] = _timed(writer.finalize)
    out["entries"] = entries
    return out


def _stand_in_features(i: int, count: int, dim: int, storage: Storage | None):
    """Task body: ``count`` described images (4096 keypoints, ``dim``-D float32), as a describe
    actor returns them: a list of ``Described``, or packed into a piece with ``storage``
    (float16 descriptors if ``storage.as_half``)."""
    rng = np.random.default_rng(i)
    xy = (rng.random((4096, 2)) * 1000).astype(np.float32)
    out = [Described(f"im{i:05d}_{k}.jpg", (1080, 720),
                     Keypoints(xy, np.ones(4096, np.float32)),
                     rng.standard_normal((4096, dim)).astype(np.float32))
           for k in range(count)]
    return pack_described(out, storage) if storage is not None else out


def _stand_in_matches(i: int, count: int, root_attrs: dict | None):
    """Task body: ``count`` matched pairs (4096 keypoints), as a match actor returns them."""
    rng = np.random.default_rng(i)
    pairs = [(f"a{i:05d}_{k}.jpg", f"b{k}.jpg") for k in range(count)]
    results = [(rng.integers(-1, 4096, 4096).astype(np.int32),
                rng.random(4096, dtype=np.float32)) for _ in range(count)]
    if root_attrs is None:
        return list(zip(pairs, results, strict=True))
    prints = {n: "f" * 40 for pair in pairs for n in pair}
    return pack_matches(pairs, results, prints, root_attrs)


def _pack_cost(body, storage) -> float:
    """Seconds ``body(storage)`` (packed) takes more than ``body(None)`` (best of 3 each)."""
    packed = min(_timed(lambda: body(storage)) for _ in range(3))
    return packed - min(_timed(lambda: body(None)) for _ in range(3))


def driver_ceiling(ray, folder: Path, entries: int) -> dict[str, dict[str, float]]:
    """The driver's cost per entry, results handed over one by one vs packed into pieces
    (module docstring); every stand-in is computed before the clock starts."""
    conf = get_conf("sift")
    attrs = {"conf": "bench", "conf_json": json.dumps(conf)}
    features = ray.remote(_stand_in_features)
    matches = ray.remote(_stand_in_matches)
    out: dict[str, dict[str, float]] = {}
    cases = [("features 4096 x 128 float32 (2.0 MiB)", 8, 128, False),
             ("features DIFT-SD 4096 x 640 float16 (5.0 MiB)", 1, 640, True),  # batch 1
             ("matches 4096 (32 KiB)", 64, 0, False)]
    for label, per, dim, half in cases:
        n_tasks = max(1, entries // per // (4 if dim == 640 else 1))  # DIFT-SD: 1/4 (memory)
        # two rounds, the modes alternating (a disk's write-back budget favours who goes
        # first); the faster round of each mode is kept
        for mode in ("one by one", "pieces", "one by one", "pieces"):
            path = folder / "ceiling.h5"
            is_matches = dim == 0
            check = is_complete_matches if is_matches else is_complete_features
            writer = ShardedH5Writer(path, check, dict(attrs),
                                     shard_entries=4096 if is_matches else 16)
            if is_matches:
                refs = [matches.remote(i, per, writer.root_attrs if mode == "pieces" else None)
                        for i in range(n_tasks)]
            else:
                storage = Storage(half, dict(writer.root_attrs)) if mode == "pieces" else None
                refs = [features.remote(i, per, dim, storage) for i in range(n_tasks)]
            ray.wait(refs, num_returns=len(refs), fetch_local=True)
            start = time.perf_counter()
            for ref in refs:
                got = ray.get(ref)
                if mode == "pieces":
                    keys = ([pair_key(*p) for p in got.pairs] if is_matches else got.names)
                    writer.add_piece(got.piece, keys)
                elif is_matches:
                    for pair, (m0, s0) in got:
                        writer.write(*match_entry(pair, m0, s0, "f" * 40, "f" * 40))
                else:
                    for result in got:
                        writer.write(result.name, feature_entry(result, half))
            receive = time.perf_counter() - start
            merge = _timed(writer.finalize)
            n = n_tasks * per
            pack_s = 0.0
            if mode == "pieces":  # what packing costs the worker (here, in this process)
                pack_s = (_pack_cost(partial(_stand_in_matches, 0, per), writer.root_attrs)
                          if is_matches else
                          _pack_cost(partial(_stand_in_features, 0, per, dim),
                                     Storage(half, dict(writer.root_attrs))))
            row = {"entries": n, "receive_ms_per_entry": 1e3 * receive / n,
                   "merge_ms_per_entry": 1e3 * merge / n,
                   "receive_entries_per_s": n / receive, "with_merge_entries_per_s":
                   n / (receive + merge), "mb_per_entry": path.stat().st_size / 2**20 / n,
                   "worker_pack_ms_per_entry": 1e3 * pack_s / per}
            old = out.get(f"{label}, {mode}")
            if old is not None and old["receive_ms_per_entry"] + old["merge_ms_per_entry"] < \
                    row["receive_ms_per_entry"] + row["merge_ms_per_entry"]:
                row = old
            out[f"{label}, {mode}"] = row
            print(f"{label:42s} {mode:10s}: receive {row['receive_ms_per_entry']:.3f} "
                  f"ms/entry ({row['receive_entries_per_s']:.0f}/s), merge "
                  f"{row['merge_ms_per_entry']:.3f} ms/entry; with merge "
                  f"{row['with_merge_entries_per_s']:.0f}/s; worker packs in "
                  f"{row['worker_pack_ms_per_entry']:.3f} ms/entry", flush=True)
            path.unlink()
            del refs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=60, help="first N exhaustive pairs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--merge-entries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each backend, interleaved; the best is kept (the "
                             "machine may be shared)")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only the driver's ceiling (module docstring)")
    parser.add_argument("--ceiling-entries", type=int, default=512)
    parser.add_argument("--ceiling-dir", type=Path, default=None,
                        help="where the ceiling's outputs go (e.g. /dev/shm: the driver's CPU "
                             "cost without the disk's bandwidth)")
    args = parser.parse_args()
    logging.getLogger("dift_sfm").setLevel(logging.WARNING)
    if args.ceiling_only:
        ray = connect(RayOptions())
        with tempfile.TemporaryDirectory(dir=args.ceiling_dir) as tmp:
            result = driver_ceiling(ray, Path(tmp), args.ceiling_entries)
        print(json.dumps({"ceiling": result, "date": datetime.date.today().isoformat(),
                          "machine": platform.node(), "cpus": os.cpu_count(),
                          "load": os.getloadavg()[0], "ray": ray.__version__}))
        return
    if not SACRE.is_dir():
        sys.exit(f"needs {SACRE}")
    conf = get_conf("sift")
    rows, info = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = _images(tmp / "images", args.copies)
        pairs_path = tmp / "pairs.txt"
        write_pairs(pairs_path, exhaustive_pairs(names)[:args.pairs])
        start = time.perf_counter()
        ray = connect(RayOptions())
        info["cluster_start_s"] = time.perf_counter() - start
        best: dict[str, tuple] = {}
        for r in range(args.repeats):
            out = tmp / f"run{r}"
            out.mkdir()
            wall = _timed(lambda o=out: extract_features(conf, tmp / "images", o / "local.h5"))
            mwall = _timed(lambda o=out: match_features(conf, pairs_path, o / "local.h5",
                                                        o / "local_m.h5"))
            runs = [("local", len(names) / wall, 0.0, args.pairs / mwall, 0.0)]
            for workers in args.workers:
                opts = RayOptions(workers=workers)
                ext = RayExtractBackend(conf, tmp / "images", opts)
                wall = _timed(lambda ext=ext, w=workers, o=out: extract_features(
                    conf, tmp / "images", o / f"ray{w}.h5", backend=ext))
                mat = RayMatchBackend(conf["matcher"], opts)
                mwall = _timed(lambda mat=mat, w=workers, o=out: match_features(
                    conf, pairs_path, o / "local.h5", o / f"ray{w}_m.h5", backend=mat))
                runs.append((f"ray, {workers} worker(s), prep "
                             f"{'tasks' if ext.stats['prep_slots'] else 'in workers'}",
                             len(names) / (wall - ext.stats["startup_s"]),
                             ext.stats["startup_s"],
                             args.pairs / (mwall - mat.stats["startup_s"]),
                             mat.stats["bytes_shipped"] / args.pairs / 2**20))
            for row in runs:
                old = best.get(row[0])
                best[row[0]] = row if old is None else (
                    row[0], max(row[1], old[1]), min(row[2], old[2]), max(row[3], old[3]),
                    row[4])
        rows = list(best.values())
        info["load_average"] = os.getloadavg()
        info["overhead"] = ray_overhead(ray)
        info["merge"] = merge_cost(tmp, args.merge_entries)
        info["ceiling"] = driver_ceiling(ray, tmp, args.ceiling_entries)
    print(f"\n{len(names)} images, {args.pairs} pairs, sift conf; {platform.processor() or ''} "
          f"{os.cpu_count()} CPUs; {datetime.date.today()}; ray {ray.__version__}\n")
    print("| backend | images/s | start-up s | pairs/s | descriptor MiB put per pair |")
    print("|---|---:|---:|---:|---:|")
    for name, ips, startup, pps, mib in rows:
        print(f"| {name} | {ips:.2f} | {startup:.1f} | {pps:.2f} | {mib:.2f} |")
    print(json.dumps({"rows": rows, **info}, default=float))


if __name__ == "__main__":
    main()
