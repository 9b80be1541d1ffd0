"""Matching rate (pairs/s) through ``match_features``: reading features.h5, matching and
writing matches.h5 included; batched (the default backend) against one pair per call.

Random descriptors (each image a noisy permutation of one base set, so real matches exist)
are written to a real features.h5; the pairs are the first exhaustive pairs of the images.

    python benchmarks/bench_match_gpu.py --device cuda            # 4096 kpts, D=640 and 512
    python benchmarks/bench_match_gpu.py --device cpu             # sift-like: 4096 kpts, 128-D

On CPU it also times, in the same run, the similarity product alone (``d0 @ d1.T``, the
floor) against one pair of the ``sift`` conf's matching, and reports the ratio. The last line
printed is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dift_sfm.confs import get_conf  # noqa: E402
from dift_sfm.formats.features import feature_datasets, is_complete_features  # noqa: E402
from dift_sfm.formats.h5store import ShardedH5Writer  # noqa: E402
from dift_sfm.formats.matches import MatchesReader  # noqa: E402
from dift_sfm.match import match_features  # noqa: E402
from dift_sfm.matchers.mnn import mnn_batch, prepare_descriptors  # noqa: E402
from dift_sfm.pairs import exhaustive_pairs, write_pairs  # noqa: E402


def write_features(path: Path, images: int, n: int, dim: int) -> list[str]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, dim), dtype=np.float32)
    writer = ShardedH5Writer(path, is_complete_features, shard_entries=64)
    names = [f"{i:04d}.jpg" for i in range(images)]
    for name in names:
        d = base[rng.permutation(n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        writer.write(name, feature_datasets(rng.random((n, 2), dtype=np.float32) * 1000, d,
                                            np.ones(n, np.float32), (1000, 1000), False))
    writer.finalize()
    return names


def run_match(conf: dict, pairs: Path, feats: Path, out: Path) -> float:
    t0 = time.perf_counter()
    match_features(conf, pairs, feats, out, overwrite=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keypoints", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=None,
                        help="descriptor sizes (default: 640 512 on CUDA, 128 on CPU)")
    parser.add_argument("--images", type=int, default=None,
                        help="images (default: 64 on CUDA, 2016 pairs; 8 on CPU)")
    parser.add_argument("--per-pair-max", type=int, default=None,
                        help="pairs for the one-pair-per-call row (default 300 CUDA, 8 CPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cuda = args.device.startswith("cuda")
    dims = args.dims or ([640, 512] if cuda else [128])
    images = args.images or (64 if cuda else 8)
    per_pair_max = args.per_pair_max or (300 if cuda else 8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dim in dims:
            conf_name = {640: "dift-sd", 512: "dift-adm"}.get(dim, "sift")
            feats = tmp / f"f{dim}.h5"
            names = write_features(feats, images, args.keypoints, dim)
            all_pairs = exhaustive_pairs(names)
            pairs_file, few_file = tmp / "pairs.txt", tmp / "few.txt"
            write_pairs(pairs_file, all_pairs)
            write_pairs(few_file, all_pairs[:per_pair_max])
            row = {"conf": conf_name, "D": dim, "keypoints": args.keypoints,
                   "pairs": len(all_pairs)}
            for label, over, pfile, npairs in [
                    ("batched", {}, pairs_file, len(all_pairs)),
                    ("batched_fp32", {"matcher.fp16": False}, pairs_file, len(all_pairs)),
                    ("per_pair", {"matcher.pair_batch": 1, "matcher.fp16": False}, few_file,
                     min(per_pair_max, len(all_pairs)))]:
                if label == "batched_fp32" and not cuda:
                    continue  # fp16 is off on CPU anyway
                conf = get_conf(conf_name, {"matcher.device": args.device, **over})
                wall = run_match(conf, pfile, feats, tmp / f"m_{label}.h5")
                row[f"{label}_pairs_per_s"] = round(npairs / wall, 1)
            if cuda:
                row["fp16_vs_fp32_same_matches"] = round(
                    agreement(tmp / "m_batched.h5", tmp / "m_batched_fp32.h5", all_pairs), 6)
            row["per_pair_vs_batched_same_matches"] = agreement(
                tmp / "m_per_pair.h5", tmp / ("m_batched_fp32.h5" if cuda else "m_batched.h5"),
                all_pairs[:per_pair_max])
            if not cuda:
                row.update(floor_ratio(args.keypoints, dim, get_conf(conf_name)))
            rows.append(row)
            print(row, flush=True)
            feats.unlink()
    device = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, " \
        f"{torch.get_num_threads()} threads"
    print(json.dumps({"bench": "match", "device": device, "torch": torch.__version__,
                      "date": datetime.date.today().isoformat(), "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
