"""Matching rate (pairs/s) through ``match_features``: reading features.h5, matching and
writing matches.h5 included; batched (the default backend) against one pair per call, and the
kernel alone as the ceiling.

Random descriptors (each image a noisy permutation of one base set, so real matches exist)
are written to a real features.h5; the pairs are the exhaustive pairs of the images.

    python benchmarks/bench_match_gpu.py --device cuda     # 96 images (4560 pairs), D=640, 512
    python benchmarks/bench_match_gpu.py --device cpu      # sift-like: 8 images, 128-D

Per descriptor size, in this order (the first is the one that matters):

- a **warm-up**: ``match_features`` on the first ``--warmup-pairs`` pairs, once per variant
  below, so that CUDA context creation, cuBLAS set-up and lazy kernel loading are outside
  every timed run (``warmup_s``, top level: the very first one, CUDA start included;
  ``<variant>_warmup_s`` per row);
- ``batched`` (the conf's defaults: 32 pairs per product, fp16 on CUDA), over every pair:
  ``batched_pairs_per_s`` is the **wall** rate (pairs / wall time of ``match_features``:
  start-up, reading, matching, writing and the final merge), ``batched_steady_pairs_per_s``
  the **steady-state** rate (entries written between the first and the last call of
  ``ShardedH5Writer.write``, over the time between them: start-up and merge left out), and
  ``batched_detail`` the stage times (below);
- ``kernel``: ``mnn_batch`` alone on ``--kernel-batch`` pairs (default: the conf's
  ``pair_batch``, 32 on CUDA) of descriptors already resident on the device (the conf's
  metric, tests and precision), called in a loop and synchronised after each call (the copy
  of its results to the host included, as ``match_features`` needs them):
  ``kernel_pairs_per_s`` (median call), the ceiling of the batched rate; on CUDA also in
  fp32 (``kernel_fp32_pairs_per_s``);
- on CUDA ``batched_fp32`` (``matcher.fp16: false``) over the exhaustive pairs of the first
  ``--fp32-images`` images (an exhaustive set of its own, so its reads are those of a
  smaller run), for ``fp16_vs_fp32_same_matches`` (share of keypoints with the same match in
  both, over those pairs);
- ``per_pair`` (one pair per call, fp32) over the first ``--per-pair-max`` of those pairs
  (CPU: of all pairs), for ``per_pair_vs_batched_same_matches`` (against ``batched_fp32`` on
  CUDA, ``batched`` on CPU, fp32 there);
- on CPU ``floor_ratio``: the similarity product alone (``d0 @ d1.T``, the floor) against
  one pair of the conf's matching (``product_ms``, ``pair_ms``, ``pair_over_product``), and
  against a pair through ``match_features`` in steady state, reading and writing included
  (``steady_pair_ms``, ``steady_over_product``).

Stage times (``<variant>_detail``) come from wrapping the package's methods for the run
(cumulative seconds in the thread that calls them; the reader thread overlaps the matcher
thread and the writing loop, so they do not add up to the wall time): ``read_s`` and
``read_calls`` (``FeaturesReader.descriptors``: more calls than images means the backend's
descriptor cache re-reads images), ``prepare_s`` (the matcher's ``prepare``: host side of
moving descriptors to the device, in the reader thread, not synchronised), ``match_s``
(the matcher's ``match_prepared``, in the matcher thread; on CUDA the wrapper calls
``torch.cuda.synchronize()`` before it stops the clock, so the kernels' time is counted
even if the matcher returns before they finish), ``write_s`` (``ShardedH5Writer.write``, in
the caller's loop; if the writer hands entries to a helper, the hand-over), ``finalize_s``
(``ShardedH5Writer.finalize``: closing shards, the merge), ``startup_s`` (call to the first
entry written) and ``tail_s`` (last entry written to the return, finalize included). Only
``match_features`` and the public method names are relied on: a stage whose method is gone
is reported as null, and the steady rate too when ``write`` is never called.

Each timed ``match_features`` run prints its stage times as a JSON line (``dim``,
``variant``, ...) as soon as it ends. The last line printed is one JSON object with every
row; the same object (``partial``: true) is printed after each descriptor size, so a run cut
short keeps the finished rows.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dift_sfm.match as match_module  # noqa: E402
from dift_sfm.confs import get_conf  # noqa: E402
from dift_sfm.formats import h5store  # noqa: E402
from dift_sfm.formats.features import (  # noqa: E402
    FeaturesReader,
    feature_datasets,
    is_complete_features,
)
from dift_sfm.formats.h5store import ShardedH5Writer  # noqa: E402
from dift_sfm.formats.matches import MatchesReader  # noqa: E402
from dift_sfm.match import match_features  # noqa: E402
from dift_sfm.matchers import MATCHERS, get_matcher  # noqa: E402
from dift_sfm.matchers.mnn import mnn_batch, prepare_descriptors  # noqa: E402
from dift_sfm.pairs import exhaustive_pairs, write_pairs  # noqa: E402


class Probe:
    """Cumulative time and calls per stage, and when ``write`` was first and last called."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sync_cuda = False
        self.wrapped: set[str] = set()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.seconds: dict[str, float] = defaultdict(float)
            self.calls: dict[str, int] = defaultdict(int)
            self.first_write: float | None = None
            self.last_write: float | None = None

    def wrap(self, cls: type, method: str, stage: str, sync: bool = False) -> None:
        """Time ``cls.method`` (on the class of the MRO that defines it, wrapped once)."""
        owner = next((c for c in cls.__mro__ if method in vars(c)), None)
        if owner is None or getattr(vars(owner)[method], "_probe_stage", None):
            return
        fn = vars(owner)[method]
        probe = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                if sync and probe.sync_cuda:
                    torch.cuda.synchronize()
                return out
            finally:
                t1 = time.perf_counter()
                with probe.lock:
                    probe.seconds[stage] += t1 - t0
                    probe.calls[stage] += 1
                    if stage == "write":
                        if probe.first_write is None:
                            probe.first_write = t1
                        probe.last_write = t1

        wrapper._probe_stage = stage  # type: ignore[attr-defined]
        setattr(owner, method, wrapper)
        self.wrapped.add(stage)

    def install(self) -> None:
        """Wrap what ``match_features`` uses: the writer and reader classes it names, and
        every registered matcher class."""
        for cls in {ShardedH5Writer, h5store.ShardedH5Writer,
                    getattr(match_module, "ShardedH5Writer", ShardedH5Writer)}:
            self.wrap(cls, "write", "write")
            self.wrap(cls, "finalize", "finalize")
        for cls in {FeaturesReader, getattr(match_module, "FeaturesReader", FeaturesReader)}:
            self.wrap(cls, "descriptors", "read")
        for cls in set(MATCHERS.values()):
            self.wrap(cls, "prepare", "prepare")
            self.wrap(cls, "match_prepared", "match", sync=True)

    def report(self, t0: float, t_end: float) -> dict:
        with self.lock:
            info: dict = {"wall_s": round(t_end - t0, 3)}
            for stage in ("read", "prepare", "match", "write", "finalize"):
                ok = stage in self.wrapped
                info[f"{stage}_s"] = round(self.seconds.get(stage, 0.0), 3) if ok else None
            info["read_calls"] = self.calls.get("read", 0) if "read" in self.wrapped else None
            info["match_calls"] = self.calls.get("match", 0) if "match" in self.wrapped else None
            writes = self.calls.get("write", 0)
            info["entries_written"] = writes
            if self.first_write is not None:
                info["startup_s"] = round(self.first_write - t0, 3)
                info["tail_s"] = round(t_end - self.last_write, 3)
            span = (self.last_write - self.first_write) if self.first_write is not None else 0.0
            info["steady_s"] = round(span, 3)
            info["steady_pairs_per_s"] = round((writes - 1) / span, 1) if (
                writes > 1 and span > 0) else None
        return info


PROBE = Probe()


def write_features(path: Path, images: int, n: int, dim: int) -> list[str]:
    """``images`` entries of n random keypoints with (n, dim) unit descriptors, each a noisy
    permutation of one base set (drawn with torch on the CPU: fast, and CUDA stays untouched
    until the warm-up)."""
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    base = torch.randn(n, dim, generator=gen)
    writer = ShardedH5Writer(path, is_complete_features, shard_entries=64)
    names = [f"{i:04d}.jpg" for i in range(images)]
    for name in names:
        d = base[torch.randperm(n, generator=gen)] + 0.6 * torch.randn(n, dim, generator=gen)
        d = F.normalize(d, dim=1).numpy()
        writer.write(name, feature_datasets(rng.random((n, 2), dtype=np.float32) * 1000, d,
                                            np.ones(n, np.float32), (1000, 1000), False))
    writer.finalize()
    return names


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def run_match(conf: dict, pairs: Path, feats: Path, out: Path, cuda: bool) -> dict:
    """``match_features`` once, instrumented: wall rate, steady rate, stage times."""
    PROBE.reset()
    t0 = time.perf_counter()
    match_features(conf, pairs, feats, out, overwrite=True)
    sync(cuda)
    return PROBE.report(t0, time.perf_counter())


def agreement(a: Path, b: Path, pairs: list[tuple[str, str]]) -> float:
    """Share of keypoints of image 0 whose match (or -1) is the same in both files."""
    same = total = 0
    with MatchesReader(a) as fa, MatchesReader(b) as fb:
        for n0, n1 in pairs:
            ma = fa.file[f"{n0}/{n1}/matches0"][()]
            mb = fb.file[f"{n0}/{n1}/matches0"][()]
            same += int((ma == mb).sum())
            total += len(ma)
    return same / max(1, total)


def kernel_rate(conf: dict, n: int, dim: int, batch: int, device: str, half: bool,
                seconds: float, min_calls: int = 3, images: int = 8) -> dict:
    """``mnn_batch`` on ``batch`` pairs of resident device descriptors, in a loop."""
    m = conf["matcher"]
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(n, dim, generator=gen)
    imgs = [prepare_descriptors(F.normalize(base[torch.randperm(n, generator=gen)] + 0.6 *
                                            torch.randn(n, dim, generator=gen), dim=1),
                                m["metric"], device) for _ in range(images)]
    d0s = [imgs[b % images] for b in range(batch)]
    d1s = [imgs[(b + 1 + (b // images) % (images - 1)) % images] for b in range(batch)]
    cuda = is_cuda(device)

    def call() -> None:
        mnn_batch(d0s, d1s, m["metric"], m["ratio_threshold"], m["min_score"], half=half)

    call()  # warm-up: this shape's kernels
    sync(cuda)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < seconds
                                     and len(times) < 1000):
        t0 = time.perf_counter()
        call()
        sync(cuda)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"pairs_per_s": round(batch / med, 1), "batch_ms": round(1e3 * med, 2),
            "best_batch_ms": round(1e3 * min(times), 2), "calls": len(times)}


def floor_ratio(n: int, dim: int, conf: dict, repeats: int = 5) -> dict:
    """CPU: one pair of ``conf``'s matching against its similarity product alone."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((n, dim), dtype=np.float32)
    d0 = prepare_descriptors(base[rng.permutation(n)] + 0.6 * rng.standard_normal(
        (n, dim), dtype=np.float32), "cosine")
    d1 = prepare_descriptors(base, "cosine")
    m = conf["matcher"]

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_mm = best(lambda: d0 @ d1.T)
    t_pair = best(lambda: mnn_batch([d0], [d1], m["metric"], m["ratio_threshold"],
                                    m["min_score"]))
    return {"product_ms": round(1e3 * t_mm, 1), "pair_ms": round(1e3 * t_pair, 1),
            "pair_over_product": round(t_pair / t_mm, 2)}


def device_name(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keypoints", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=None,
                        help="descriptor sizes (default: 640 512 on CUDA, 128 on CPU)")
    parser.add_argument("--images", type=int, default=None,
                        help="images (default: 96 on CUDA, 4560 pairs; 8 on CPU, 28 pairs)")
    parser.add_argument("--per-pair-max", type=int, default=None,
                        help="pairs for the one-pair-per-call row (default 300 CUDA, 8 CPU)")
    parser.add_argument("--fp32-images", type=int, default=48,
                        help="CUDA: images whose exhaustive pairs the fp32 run matches "
                             "(default 48: 1128 pairs)")
    parser.add_argument("--warmup-pairs", type=int, default=None,
                        help="pairs of each warm-up run (default 64 CUDA, 2 CPU)")
    parser.add_argument("--kernel-batch", type=int, default=None,
                        help="pairs per mnn_batch call of the kernel loop (default: the conf's "
                             "pair_batch, 32 on CUDA, 1 on CPU)")
    parser.add_argument("--kernel-seconds", type=float, default=None,
                        help="time per kernel loop (default 2 CUDA, 0.5 CPU; at least 3 calls)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cuda = is_cuda(args.device)
    dims = args.dims or ([640, 512] if cuda else [128])
    images = args.images or (96 if cuda else 8)
    per_pair_max = args.per_pair_max or (300 if cuda else 8)
    warmup_pairs = args.warmup_pairs or (64 if cuda else 2)
    kernel_seconds = args.kernel_seconds if args.kernel_seconds is not None else (
        2.0 if cuda else 0.5)
    PROBE.install()
    PROBE.sync_cuda = cuda
    rows: list[dict] = []
    head: dict = {"bench": "match", "device": None, "torch": torch.__version__,
                  "date": datetime.date.today().isoformat(), "images": images,
                  "keypoints": args.keypoints, "warmup_s": None,
                  "instrumented": sorted(PROBE.wrapped)}

    def emit(partial: bool) -> None:
        head["device"] = head["device"] or device_name(cuda)
        print(json.dumps({**head, "rows": rows, "partial": partial}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dim in dims:
            conf_name = {640: "dift-sd", 512: "dift-adm"}.get(dim, "sift")
            feats = tmp / f"f{dim}.h5"
            t0 = time.perf_counter()
            names = write_features(feats, images, args.keypoints, dim)
            build_s = time.perf_counter() - t0
            all_pairs = exhaustive_pairs(names)
            sub_pairs = exhaustive_pairs(names[:args.fp32_images]) if cuda else all_pairs
            per_pairs = sub_pairs[:per_pair_max]
            files = {"all": (tmp / "pairs.txt", all_pairs), "sub": (tmp / "sub.txt", sub_pairs),
                     "few": (tmp / "few.txt", per_pairs),
                     "warm": (tmp / "warm.txt", all_pairs[:warmup_pairs])}
            for path, pairs in files.values():
                write_pairs(path, pairs)
            variants = [("batched", {}, "all")]
            if cuda:
                variants.append(("batched_fp32", {"matcher.fp16": False}, "sub"))
            variants.append(("per_pair", {"matcher.pair_batch": 1, "matcher.fp16": False},
                             "few"))
            confs = {label: get_conf(conf_name, {"matcher.device": args.device, **over})
                     for label, over, _ in variants}
            row: dict = {"conf": conf_name, "D": dim, "keypoints": args.keypoints,
                         "pairs": len(all_pairs), "features_build_s": round(build_s, 2)}
            # warm-up of every variant: CUDA start, cuBLAS handles, lazy kernel loading
            for label, _, _ in variants:
                t0 = time.perf_counter()
                match_features(confs[label], files["warm"][0], feats, tmp / "warm.h5",
                               overwrite=True)
                sync(cuda)
                row[f"{label}_warmup_s"] = round(time.perf_counter() - t0, 3)
                if head["warmup_s"] is None:
                    head["warmup_s"] = row[f"{label}_warmup_s"]
            matcher = get_matcher(confs["batched"]["matcher"])
            row["pair_batch"] = getattr(matcher, "pair_batch", 1)
            half = bool(getattr(matcher, "half", False)) and cuda
            kernel_batch = args.kernel_batch or row["pair_batch"]
            row["fp16"] = half
            # the headline: every pair, the conf's defaults
            detail = run_match(confs["batched"], files["all"][0], feats, tmp / "m_batched.h5",
                               cuda)
            row["batched_pairs_per_s"] = round(len(all_pairs) / detail["wall_s"], 1)
            row["batched_steady_pairs_per_s"] = detail["steady_pairs_per_s"]
            row["batched_detail"] = detail
            print(json.dumps({"dim": dim, "variant": "batched", **detail}), flush=True)
            # the ceiling: the kernel on resident descriptors
            k = kernel_rate(confs["batched"], args.keypoints, dim, kernel_batch, args.device,
                            half, kernel_seconds)
            row.update(kernel_batch=kernel_batch, kernel_pairs_per_s=k["pairs_per_s"],
                       kernel_batch_ms=k["batch_ms"], kernel_detail=k)
            if cuda and half:
                k32 = kernel_rate(confs["batched"], args.keypoints, dim, kernel_batch,
                                  args.device, False, kernel_seconds)
                row.update(kernel_fp32_pairs_per_s=k32["pairs_per_s"],
                           kernel_fp32_batch_ms=k32["batch_ms"])
            for label, _, key in variants[1:]:
                path, pairs = files[key]
                d = run_match(confs[label], path, feats, tmp / f"m_{label}.h5", cuda)
                row[f"{label}_pairs_per_s"] = round(len(pairs) / d["wall_s"], 1)
                row[f"{label}_steady_pairs_per_s"] = d["steady_pairs_per_s"]
                row[f"{label}_pairs"] = len(pairs)
                row[f"{label}_detail"] = d
                print(json.dumps({"dim": dim, "variant": label, **d}), flush=True)
            if cuda:
                row["fp16_vs_fp32_same_matches"] = round(
                    agreement(tmp / "m_batched.h5", tmp / "m_batched_fp32.h5", sub_pairs), 6)
            row["per_pair_vs_batched_same_matches"] = agreement(
                tmp / "m_per_pair.h5", tmp / ("m_batched_fp32.h5" if cuda else "m_batched.h5"),
                per_pairs)
            if not cuda:
                row.update(floor_ratio(args.keypoints, dim, get_conf(conf_name)))
                steady = row.get("batched_steady_pairs_per_s")
                if steady:  # match_features per pair (reading, writing included) vs product
                    row["steady_pair_ms"] = round(1e3 / steady, 1)
                    row["steady_over_product"] = round(1e3 / steady / row["product_ms"], 2)
            rows.append(row)
            feats.unlink()
            emit(partial=True)
    emit(partial=False)


if __name__ == "__main__":
    main()
