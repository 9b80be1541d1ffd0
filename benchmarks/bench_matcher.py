"""Matcher speed and peak memory: our chunked MNN against a dense-similarity MNN.

The dense baseline builds the full (N0, N1) similarity matrix, as hloc's nearest-neighbour
matcher does; ours streams it in row chunks. Same machine, same run, same inputs.

    python benchmarks/bench_matcher.py [--sizes 2000 8000 16000] [--dims 128 640] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from dift_sfm.matchers import mutual_nearest_neighbours  # noqa: E402


def _inputs(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    d1 = rng.standard_normal((n, d)).astype(np.float32)
    d0 = d1[rng.permutation(n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return d0, d1


def _run(kind: str, n: int, d: int, device: str, queue: mp.Queue) -> None:
    """One measurement in a fresh process, so peak RSS belongs to this case alone."""
    torch.set_num_threads(torch.get_num_threads())
    d0, d1 = _inputs(n, d)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if kind == "dense":
        if device.startswith("cuda"):
            raise SystemExit("dense baseline is CPU-only here")
        from kornia.feature import match_mnn  # dense (N0, N1) distance matrix

        t0, t1 = (torch.nn.functional.normalize(torch.as_tensor(x), dim=1) for x in (d0, d1))
        _, idx = match_mnn(t0, t1)
        m = np.full(len(d0), -1, np.int64)
        m[idx[:, 0].numpy()] = idx[:, 1].numpy()
    else:
        m, _ = mutual_nearest_neighbours(d0, d1, device=device)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    queue.put({"kind": kind, "n": n, "d": d, "seconds": dt, "extra_rss_mib": peak / 1024,
               "gpu_peak_mib": gpu, "matches": int((m > -1).sum()), "checksum": int(m.sum())})


def measure(kind: str, n: int, d: int, device: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(kind, n, d, device, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"kind": kind, "n": n, "d": d, "failed": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 16000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 640])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {datetime.date.today()}")
    print("| keypoints | D | dense MNN s | dense extra RSS MiB | chunked MNN s | "
          "chunked extra RSS MiB | same matches |")
    print("|---|---|---|---|---|---|---|")
    for d in args.dims:
        for n in args.sizes:
            dense = measure("dense", n, d, "cpu")
            ours = measure("chunked", n, d, args.device)
            same = dense.get("checksum") == ours.get("checksum")
            rows.append({"dense": dense, "chunked": ours})
            print(f"| {n} | {d} | {dense['seconds']:.2f} | {dense['extra_rss_mib']:.0f} | "
                  f"{ours['seconds']:.2f} | {ours['extra_rss_mib']:.0f} | {same} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
