"""Per-pair cost of ``match_features`` outside the matching kernels, on this machine.

A features.h5 of random, L2-normalised descriptors is written with the package's own writer;
``match_features`` then runs its default ``LocalBackend`` (reader thread, matcher thread,
writing loop, shard merge) with a stand-in matcher, defined here, that returns precomputed
matches instantly. What is timed is therefore everything a GPU run pays besides its kernels.

    python benchmarks/bench_match_overhead.py                       # 64 images x 4096 x 640-D
    python benchmarks/bench_match_overhead.py --images 16 --dim 128 --profile

Stages are timed by wrapping the package's functions (cumulative seconds in the thread that
runs them; the reader overlaps the writing loop, so stages do not add up to the wall time):
``read`` (``FeaturesReader.descriptors``), ``prepare`` (the stand-in's host part of moving
descriptors to a device), ``fingerprint`` (``FeaturesReader.fingerprint``), ``write``
(``ShardedH5Writer.write``), ``finalize`` (the merge into the output), ``startup`` (call to
the first entry written). The last line printed is one JSON object; ``digest`` hashes every
dataset and attribute of the output, so runs before and after a change can be compared.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import hashlib
import json
import logging
import platform
import pstats
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dift_sfm.confs import get_conf  # noqa: E402
from dift_sfm.formats.features import (  # noqa: E402
    FeaturesReader,
    feature_datasets,
    is_complete_features,
)
from dift_sfm.formats.h5store import ShardedH5Writer  # noqa: E402
from dift_sfm.match import LocalBackend, match_features  # noqa: E402
from dift_sfm.matchers.mnn import cache_budget  # noqa: E402
from dift_sfm.pairs import exhaustive_pairs, write_pairs  # noqa: E402

STAGES: dict[str, float] = defaultdict(float)
_stage_lock = threading.Lock()
_first_write: list[float] = []


def timed(stage: str, fn):
    """``fn`` whose run time is added to ``STAGES[stage]``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            t1 = time.perf_counter()
            with _stage_lock:
                STAGES[stage] += t1 - t0
                if stage == "write" and not _first_write:
                    _first_write.append(t1)
    return wrapper


class StandInMatcher:
    """Returns precomputed matches at once: ``LocalBackend`` glue without any kernel.

    A ``dift_sfm.matchers.Matcher``; its device is the CPU (matching runs in the caller's
    thread), its cache budget the CPU default."""

    def __init__(self, n: int, pair_batch: int, seed: int = 0, launches: int = 0,
                 device_ms: float = 0.0):
        rng = np.random.default_rng(seed)
        self.conf = {"prefetch": 256}
        self.launches, self.device_ms = launches, device_ms
        self._tiny = torch.zeros(4)
        self.pair_batch = pair_batch
        self.device = torch.device("cpu")
        self.results = []
        for _ in range(16):  # ~35% of keypoints matched, as real MNN gives
            m0 = np.where(rng.random(n) < 0.35, rng.integers(0, n, n), -1).astype(np.int64)
            s0 = np.where(m0 >= 0, rng.random(n, dtype=np.float32), 0).astype(np.float32)
            self.results.append((m0, s0))
        self.calls = 0

    def __call__(self, desc0: np.ndarray, desc1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.match_prepared([self.prepare(desc0)], [self.prepare(desc1)])[0]

    def cache_bytes(self) -> int:
        return cache_budget("auto", "cpu")

    def prepare(self, desc: np.ndarray) -> torch.Tensor:
        """The host part of moving descriptors to a device: a tensor over the array."""
        return torch.from_numpy(desc)  # a CUDA copy keeps the layout: no host transpose

    def match_prepared(self, desc0: Sequence[torch.Tensor], desc1: Sequence[torch.Tensor]
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
        for _ in range(self.launches):  # like kernel launches: short calls releasing the GIL
            self._tiny.add_(1)
        if self.device_ms:  # like waiting for the device's results (GIL released)
            time.sleep(self.device_ms / 1e3)
        out = []
        for _ in desc0:
            out.append(self.results[self.calls % len(self.results)])
            self.calls += 1
        return out


def write_features(path: Path, images: int, n: int, dim: int) -> list[str]:
    """Random L2-normalised (n, dim) descriptors per image, through ``ShardedH5Writer``."""
    rng = np.random.default_rng(0)
    writer = ShardedH5Writer(path, is_complete_features, shard_entries=64)
    names = [f"{i:04d}.jpg" for i in range(images)]
    for name in names:
        d = rng.standard_normal((n, dim), dtype=np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        writer.write(name, feature_datasets(rng.random((n, 2), dtype=np.float32) * 1000, d,
                                            np.ones(n, np.float32), (1000, 1000), False))
    writer.finalize()
    return names


def digest(path: Path) -> str:
    """Hash of every group, dataset (dtype, shape, bytes) and attribute of an h5 file."""
    h = hashlib.sha256()

    def attrs(obj) -> None:
        for k in sorted(obj.attrs):
            h.update(f"{k}={obj.attrs[k]!r}".encode())

    with h5py.File(path, "r") as f:
        attrs(f)
        names: list[str] = []
        f.visit(names.append)
        for name in sorted(names):
            obj = f[name]
            h.update(name.encode())
            attrs(obj)
            if isinstance(obj, h5py.Dataset):
                v = obj[()]
                h.update(f"{v.dtype.str}{v.shape}".encode())
                h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def instrument() -> None:
    FeaturesReader.descriptors = timed("read", FeaturesReader.descriptors)
    FeaturesReader.fingerprint = timed("fingerprint", FeaturesReader.fingerprint)
    ShardedH5Writer.write = timed("write", ShardedH5Writer.write)
    ShardedH5Writer.finalize = timed("finalize", ShardedH5Writer.finalize)
    StandInMatcher.prepare = timed("prepare", StandInMatcher.prepare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--keypoints", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--pair-batch", type=int, default=32, help="as on CUDA (auto: 32)")
    parser.add_argument("--repeat", type=int, default=2, help="runs; the best one is reported")
    parser.add_argument("--profile", action="store_true", help="cProfile one extra run")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--launches", type=int, default=0,
                        help="GPU-like stand-in: torch calls per batch (each releases the GIL)")
    parser.add_argument("--device-ms", type=float, default=0.0,
                        help="GPU-like stand-in: ms per batch waiting for the device")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    instrument()
    conf = get_conf("dift-sd", {"matcher.device": "cpu"})
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        feats, pairs_file = tmp / "features.h5", tmp / "pairs.txt"
        t0 = time.perf_counter()
        names = write_features(feats, args.images, args.keypoints, args.dim)
        build_s = time.perf_counter() - t0
        pairs = exhaustive_pairs(names)
        write_pairs(pairs_file, pairs)
        n = len(pairs)
        runs = []
        for r in range(args.repeat + int(args.profile)):
            STAGES.clear()
            _first_write.clear()
            backend = LocalBackend(conf["matcher"])
            backend.matcher = StandInMatcher(args.keypoints, args.pair_batch, 0, args.launches,
                                             args.device_ms)
            out = tmp / f"matches{r}.h5"
            prof = cProfile.Profile() if r == args.repeat else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            match_features(conf, pairs_file, feats, out, overwrite=True, backend=backend)
            if prof:
                prof.disable()
                pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                continue
            wall = time.perf_counter() - t0
            startup = (_first_write[0] - t0) if _first_write else wall
            run = {"wall_s": wall, "startup_s": startup, **dict(STAGES),
                   "digest": digest(out)}
            runs.append(run)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()},
                  flush=True)
        if len({r["digest"] for r in runs}) != 1:
            raise SystemExit("outputs of the runs differ")
        best = min(runs, key=lambda r: r["wall_s"])
        ms = {f"{k}_ms_per_pair": round(1e3 * best.get(k, 0.0) / n, 4)
              for k in ("read", "prepare", "fingerprint", "write", "finalize")}
        ms["startup_ms_per_pair"] = round(1e3 * best["startup_s"] / n, 4)
        steady = best["wall_s"] - best["startup_s"] - best.get("finalize", 0.0)
        print(json.dumps({
            "bench": "match_overhead", "images": args.images, "keypoints": args.keypoints,
            "D": args.dim, "pairs": n, "pair_batch": args.pair_batch,
            "launches": args.launches, "device_ms": args.device_ms,
            "features_build_s": round(build_s, 2),
            "total_ms_per_pair": round(1e3 * best["wall_s"] / n, 4),
            "steady_ms_per_pair": round(1e3 * steady / (n - 1), 4), **ms,
            "pairs_per_s": round(n / best["wall_s"], 1), "digest": best["digest"],
            "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "date": datetime.date.today().isoformat()}), flush=True)


if __name__ == "__main__":
    main()
