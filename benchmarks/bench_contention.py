"""CPU work on a shared machine: match and extract alone, beside a busy loop and beside a
second dift-sfm command, in one run; the slow-down ratios say whether throughput follows the
cores a run still gets (issue 17: at most 3x slower beside one busy process on 2 cores).

    python benchmarks/bench_contention.py                  # ~3-5 min on 2 cores
    python benchmarks/bench_contention.py --pairs 12 --images 3 --rounds 1   # quicker

Workloads (each timed in a fresh ``python`` process that imports dift_sfm as a user's script
does, so the thread policy of ``dift_sfm.runtime`` is the one in force):
- ``match``: ``match_features`` with the ``sift`` conf (MNN, ratio test) on the exhaustive
  pairs of the Sacre Coeur photos, 4096 keypoints (``--pairs`` of the 45), ms per pair; the
  same process also times one 4096x4096x128 similarity product (``d0 @ d1.T`` of two of the
  photos' descriptor sets) and reports match / product (the issue's <= 1.5x item);
- ``extract_sift``: ``extract_features`` with ``sift`` (DoG 4096, preparation pool), s/img;
- ``extract_sd``: the tiny SD model of ../shared/conformance/sd at 256x256, s/img.
Conditions: ``alone``; ``busy``: one ``while True: pass`` process; ``second``: a second
``dift-sfm match`` command looping on the same features (same thread policy). Policies:
``ours`` (whatever the environment and dift_sfm set) and, with ``--spinning`` (default on),
``spinning``: torch's behaviour before the policy, OpenMP threads spin-waiting as libgomp
and Intel's runtime do by default (``GOMP_SPINCOUNT=300000``, ``KMP_BLOCKTIME=200``: their
default values, and set by the user, so dift_sfm adds nothing), for matching, with
``--spinning-pairs`` pairs since it collapses under load.
Rounds alternate alone and loaded runs so that drift of a shared machine hits both; the
figure of a condition is the median of its rounds. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SACRE = SHARED / "data" / "sacre_coeur"
TINY_SD = SHARED / "conformance" / "sd" / "model"
POLICY_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


# --------------------------------------------------------------------------- worker side
def _worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    sys.path.insert(0, str(REPO))
    import dift_sfm  # noqa: F401  (the thread policy, before torch)
    from dift_sfm.confs import get_conf
    from dift_sfm.extract import extract_features
    from dift_sfm.match import match_features

    work = Path(args.work)
    result: dict = {"workload": args.worker, "policy_env": {k: os.environ.get(k)
                                                           for k in POLICY_VARS}}
    if args.worker == "match":
        import torch

        from dift_sfm.formats.features import FeaturesReader
        from dift_sfm.matchers.mnn import prepare_descriptors

        conf = get_conf("sift", {"keypoints.max_keypoints": 4096})
        pairs = work / f"pairs_{args.pairs}.txt"
        out = work / f"m_{os.getpid()}.h5"
        t0 = time.perf_counter()
        match_features(conf, pairs, work / "sift.h5", out, overwrite=True)
        result["ms_per_pair"] = 1000 * (time.perf_counter() - t0) / args.pairs
        with FeaturesReader(work / "sift.h5") as f:
            a, b = f.names[:2]
            d0 = prepare_descriptors(f.descriptors(a), "cosine")
            d1 = prepare_descriptors(f.descriptors(b), "cosine")
        times = []
        with torch.no_grad():
            for _ in range(5):
                t0 = time.perf_counter()
                d0 @ d1.T
                times.append(time.perf_counter() - t0)
        result["product_ms"] = 1000 * statistics.median(times)
        result["shape"] = [len(d0), len(d1), d0.shape[1]]
        out.unlink(missing_ok=True)
    else:
        names = sorted(p.name for p in SACRE.glob("*.jpg"))[:args.images]
        if args.worker == "extract_sift":
            conf = get_conf("sift", {"keypoints.max_keypoints": 4096})
        else:
            conf = get_conf("dift-sd", {"featurizer.model": str(TINY_SD),
                                        "featurizer.device": "cpu",
                                        "featurizer.img_size": [256, 256],
                                        "keypoints.max_keypoints": 4096})
        out = work / f"f_{os.getpid()}.h5"
        t0 = time.perf_counter()
        extract_features(conf, SACRE, out, image_list=names, overwrite=True)
        result["s_per_img"] = (time.perf_counter() - t0) / len(names)
        out.unlink(missing_ok=True)
    print(json.dumps(result))


# --------------------------------------------------------------------------- driver side
def _env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if policy == "ours" or k not in POLICY_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if policy == "spinning":  # the OpenMP runtimes' own defaults
        env.update(GOMP_SPINCOUNT="300000", KMP_BLOCKTIME="200")
    return env


def _measure(workload: str, policy: str, work: Path, args: argparse.Namespace,
             pairs: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", workload, "--work", str(work),
           "--pairs", str(pairs), "--images", str(args.images)]
    out = subprocess.run(cmd, env=_env(policy), capture_output=True, text=True, check=True,
                         timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


class _Load:
    """A competing process while the block runs: ``busy`` (a pure-Python busy loop: one core)
    or ``second`` (``dift-sfm match`` of the same features, again and again)."""

    def __init__(self, kind: str, policy: str, work: Path):
        self.kind, self.policy, self.work, self.proc = kind, policy, work, None

    def __enter__(self) -> _Load:
        if self.kind == "busy":
            cmd = [sys.executable, "-c", "while True: pass"]
        elif self.kind == "second":
            match = (f"{sys.executable} -m dift_sfm.cli match {self.work}/pairs_45.txt "
                     f"--features {self.work}/sift.h5 -o {self.work}/second.h5 --overwrite -q")
            cmd = ["bash", "-c", f"while true; do {match}; done"]
        else:
            return self
        self.proc = subprocess.Popen(cmd, env=_env(self.policy), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(2.0 if self.kind == "second" else 0.3)  # the second command gets going
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def _uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=45, help="pairs to match (of 45)")
    parser.add_argument("--images", type=int, default=4, help="photos to extract (of 10)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternations of alone and loaded runs")
    parser.add_argument("--loads", nargs="+", default=["busy", "second"],
                        choices=["busy", "second"])
    parser.add_argument("--workloads", nargs="+",
                        default=["match", "extract_sift", "extract_sd"],
                        choices=["match", "extract_sift", "extract_sd"])
    parser.add_argument("--spinning", action=argparse.BooleanOptionalAction, default=True,
                        help="also match with spin-waiting OpenMP threads (the old behaviour)")
    parser.add_argument("--spinning-pairs", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    if not SACRE.is_dir():
        raise SystemExit(f"needs the Sacre Coeur photos at {SACRE}")
    if "extract_sd" in args.workloads and not (TINY_SD / "unet").is_dir():
        raise SystemExit(f"needs the tiny SD model at {TINY_SD} (or --workloads without "
                         "extract_sd)")
    load_before = _uptime()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_contention_") as tmp:
        work = Path(tmp)
        sys.path.insert(0, str(REPO))
        from dift_sfm.pairs import write_pairs

        names = sorted(p.name for p in SACRE.glob("*.jpg"))
        subprocess.run([sys.executable, "-m", "dift_sfm.cli", "extract", str(SACRE), "-o",
                        str(work / "sift.h5"), "--conf", "sift", "--max-keypoints", "4096",
                        "-q"], env=_env("ours"), check=True)
        allpairs = list(itertools.combinations(names, 2))
        for n in {45, args.pairs, args.spinning_pairs}:
            write_pairs(work / f"pairs_{n}.txt", allpairs[:n])
        runs: list[tuple[str, str, str]] = [(w, "ours", "") for w in args.workloads]
        if args.spinning and "match" in args.workloads:
            runs.append(("match", "spinning", ""))
        samples: dict[tuple[str, str, str], list[dict]] = {}
        for r in range(args.rounds):
            for workload, policy, _ in runs:
                pairs = args.spinning_pairs if policy == "spinning" else args.pairs
                for load in ["alone", *args.loads]:
                    with _Load(load, policy, work):
                        got = _measure(workload, policy, work, args, pairs)
                    samples.setdefault((workload, policy, load), []).append(got)
                    key = "ms_per_pair" if workload == "match" else "s_per_img"
                    print(f"round {r + 1}: {workload:12s} {policy:8s} {load:6s} "
                          f"{got[key]:10.3f} {key}  (load avg {_uptime()})", flush=True)

    def med(workload: str, policy: str, load: str, key: str) -> float | None:
        got = samples.get((workload, policy, load))
        return statistics.median(g[key] for g in got) if got else None

    summary: dict = {"cpus": os.cpu_count(), "load_before": load_before,
                     "load_after": _uptime(), "rounds": args.rounds, "pairs": args.pairs,
                     "images": args.images, "seconds": round(time.perf_counter() - started)}
    print("\n| workload | policy | alone | busy loop | second dift-sfm | busy / alone | "
          "second / alone |\n|---|---|---:|---:|---:|---:|---:|")
    for workload, policy, _ in runs:
        key = "ms_per_pair" if workload == "match" else "s_per_img"
        alone = med(workload, policy, "alone", key)
        row = [alone] + [med(workload, policy, load, key) for load in ("busy", "second")]
        ratios = [None if v is None or not alone else v / alone for v in row[1:]]
        print(f"| {workload} ({key}) | {policy} | "
              + " | ".join("-" if v is None else f"{v:.3f}" for v in row) + " | "
              + " | ".join("-" if q is None else f"{q:.2f}x" for q in ratios) + " |")
        prefix = {"match": "match", "extract_sift": "extract",
                  "extract_sd": "extract_sd"}[workload]
        unit = "ms_per_pair" if workload == "match" else "s_per_img"
        if policy == "spinning":
            prefix += "_spinning"
        summary[f"{prefix}_alone_{unit}"] = alone
        summary[f"{prefix}_loaded_{unit}"] = row[1]
        summary[f"{prefix}_second_{unit}"] = row[2]
        summary[f"{prefix}_busy_ratio"] = ratios[0]
        summary[f"{prefix}_second_ratio"] = ratios[1]
    if ("match", "ours", "alone") in samples:
        product = med("match", "ours", "alone", "product_ms")
        summary["product_alone_ms"] = product
        summary["match_over_product_alone"] = summary["match_alone_ms_per_pair"] / product
        print(f"\nmatch_features {summary['match_alone_ms_per_pair']:.1f} ms/pair, one "
              f"4096x4096x128 product {product:.1f} ms (same processes): "
              f"{summary['match_over_product_alone']:.2f}x")
    print(f"load average before {load_before}, after {summary['load_after']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
