"""Appending to an h5 output costs what is added: 10 entries into outputs of 1k, 10k, 100k.

    python benchmarks/bench_append.py [--sizes 1000 10000 100000] [--repeats 5]

For features and for matches, builds an output of M cheap stand-in entries (16 keypoints,
8-D descriptors; 16-long ``matches0``) through ``ShardedH5Writer``, then times appending 10
entries the way ``extract``/``match`` do (a writer, 10 writes, ``finalize``), ``--repeats``
times (median), with the file's growth per append. Beside it, the time to copy the whole file
(what the merge of earlier versions cost at least) and, for the per-byte cost, 10 realistic
entries (4096 x 128 float32 descriptors, 2.1 MB each) appended to the 10k output.

Driver side of a distributed run (the first ceiling of the Ray backend): per entry, today's
``write`` of an entry received from a worker, against ``add_piece`` of a 16-entry piece a
worker built in memory (``build_piece``; its cost is the worker's, reported) and the
``consolidate`` that later adds the pieces' entries to the output (stand-ins of
``bench_ray.py``: 2048 keypoints x 128-D features, 4096-long matches).

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dift_sfm.formats.features import feature_datasets, is_complete_features  # noqa: E402
from dift_sfm.formats.h5store import ShardedH5Writer, build_piece  # noqa: E402
from dift_sfm.formats.matches import is_complete_matches, match_datasets  # noqa: E402


def _feature(i: int, n: int = 16, d: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return feature_datasets(rng.random((n, 2), np.float32) * 1000,
                            rng.standard_normal((n, d)).astype(np.float32),
                            np.ones(n, np.float32), (1080, 720))


def _match(i: int, n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return match_datasets(rng.integers(-1, n, n), rng.random(n, dtype=np.float32))


KINDS = {
    "features": (is_complete_features, lambda i: f"im{i:07d}.jpg", _feature),
    "matches": (is_complete_matches, lambda i: f"im{i:07d}.jpg/im{i + 1:07d}.jpg", _match),
}


def _build(path: Path, kind: str, m: int) -> float:
    check, key, data = KINDS[kind]
    start = time.perf_counter()
    writer = ShardedH5Writer(path, check, {"conf": "bench"}, shard_entries=10**9,
                             flush_seconds=1e9)
    for i in range(m):
        writer.write(key(i), data(i))
    writer.finalize()
    return time.perf_counter() - start


def _append(path: Path, kind: str, first: int, count: int = 10, data=None) -> float:
    check, key, make = KINDS[kind]
    entries = [(key(i), data if data is not None else make(i))
               for i in range(first, first + count)]
    start = time.perf_counter()
    writer = ShardedH5Writer(path, check, {"conf": "bench"})
    for name, value in entries:
        writer.write(name, value)
    writer.finalize()
    return time.perf_counter() - start


def _copy_s(path: Path) -> float:
    start = time.perf_counter()
    shutil.copyfile(path, path.with_suffix(".copy"))
    elapsed = time.perf_counter() - start
    path.with_suffix(".copy").unlink()
    return elapsed


def append_costs(folder: Path, sizes: list[int], repeats: int) -> dict:
    out: dict = {}
    for kind in KINDS:
        for m in sizes:
            path = folder / f"{kind}_{m}.h5"
            build_s = _build(path, kind, m)
            size0 = path.stat().st_size
            times, growth = [], []
            for r in range(repeats):
                before = path.stat().st_size
                times.append(_append(path, kind, m + 10 * r))
                growth.append(path.stat().st_size - before)
            out[f"{kind}_{m}"] = {
                "entries": m, "file_mb": size0 / 2**20, "build_s": build_s,
                "append10_ms": 1000 * statistics.median(times),
                "append10_ms_all": [round(1000 * t, 1) for t in times],
                "growth_kb_per_append": statistics.median(growth) / 1024,
                "full_copy_ms": 1000 * _copy_s(path),
            }
            row = out[f"{kind}_{m}"]
            print(f"{kind:8s} M={m:>7d} file {size0 / 2**20:8.1f} MB  append 10: "
                  f"{row['append10_ms']:7.1f} ms  (+{row['growth_kb_per_append']:.0f} KB)"
                  f"  full copy {row['full_copy_ms']:8.1f} ms", flush=True)
            if not (kind == "features" and m == sorted(sizes)[len(sizes) // 2]):
                path.unlink()
    # per byte: 10 realistic entries (4096 x 128 float32) into the middle-sized features file
    mid = sorted(sizes)[len(sizes) // 2]
    path = folder / f"features_{mid}.h5"
    rng = np.random.default_rng(0)
    real = feature_datasets(rng.random((4096, 2), np.float32) * 1000,
                            rng.standard_normal((4096, 128)).astype(np.float32),
                            np.ones(4096, np.float32), (1080, 720))
    nbytes = 10 * sum(v.nbytes for v in real.values())
    times = [_append(path, "features", 10**8 + 10 * r, data=real) for r in range(3)]
    t = statistics.median(times)
    out["realistic"] = {"entries_into": mid, "append10_ms": 1000 * t, "mb": nbytes / 2**20,
                        "mb_per_s": nbytes / 2**20 / t}
    print(f"realistic: 10 x 4096x128 float32 ({nbytes / 2**20:.1f} MB) into M={mid}: "
          f"{1000 * t:.1f} ms, {nbytes / 2**20 / t:.0f} MB/s", flush=True)
    path.unlink()
    return out


def driver_costs(folder: Path, entries: int) -> dict:
    """Per-entry driver work: ``write`` vs ``add_piece`` (+ the later ``consolidate``)."""
    rng = np.random.default_rng(0)
    feats = feature_datasets(rng.random((2048, 2), np.float32) * 1000,
                             rng.standard_normal((2048, 128)).astype(np.float32),
                             np.ones(2048, np.float32), (1080, 720))
    match = match_datasets(rng.integers(-1, 4096, 4096), rng.random(4096, dtype=np.float32))
    out = {}
    for kind, data, check in (("features", feats, is_complete_features),
                              ("matches", match, is_complete_matches)):
        key = KINDS[kind][1]
        base = folder / f"driver_{kind}.h5"
        _build(base, kind, 100)  # an existing output (appends go in place)
        start = time.perf_counter()
        writer = ShardedH5Writer(base, check, {"conf": "bench"}, shard_entries=256)
        for i in range(entries):
            writer.write(key(1000 + i), data)
        write_s = time.perf_counter() - start
        writer.finalize()
        start = time.perf_counter()
        keys = [[key(10**6 + p * 16 + j) for j in range(16)] for p in range(entries // 16)]
        pieces = [build_piece([(k, data, None) for k in ks], {"conf": "bench"}) for ks in keys]
        build_s = time.perf_counter() - start
        writer = ShardedH5Writer(base, check, {"conf": "bench"})
        start = time.perf_counter()
        for piece, ks in zip(pieces, keys, strict=True):
            writer.add_piece(piece, ks)
        add_s = time.perf_counter() - start
        start = time.perf_counter()
        writer.consolidate()
        consolidate_s = time.perf_counter() - start
        writer.finalize()
        n = 16 * len(pieces)
        out[kind] = {"write_ms_per_entry": 1000 * write_s / entries,
                     "add_piece_ms_per_entry": 1000 * add_s / n,
                     "consolidate_ms_per_entry": 1000 * consolidate_s / n,
                     "worker_build_piece_ms_per_entry": 1000 * build_s / n,
                     "entry_kb": sum(v.nbytes for v in data.values()) / 1024}
        print(f"driver {kind}: write {out[kind]['write_ms_per_entry']:.3f} ms/entry; "
              f"add_piece {out[kind]['add_piece_ms_per_entry']:.3f} + consolidate "
              f"{out[kind]['consolidate_ms_per_entry']:.3f} ms/entry (worker builds: "
              f"{out[kind]['worker_build_piece_ms_per_entry']:.3f} ms/entry)", flush=True)
        base.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--driver-entries", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=None, help="where the outputs are built")
    args = parser.parse_args()
    logging.getLogger("dift_sfm").setLevel(logging.WARNING)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        result = {"append": append_costs(folder, args.sizes, args.repeats),
                  "driver": driver_costs(folder, args.driver_entries)}
    for kind in KINDS:
        times = [result["append"][f"{kind}_{m}"]["append10_ms"] for m in args.sizes]
        result[f"{kind}_flatness"] = max(times) / min(times)
        print(f"{kind}: append 10, slowest / fastest across M = {max(times) / min(times):.2f}")
    result.update(date=datetime.date.today().isoformat(), machine=platform.node(),
                  cpus=os.cpu_count(), load=os.getloadavg()[0])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
