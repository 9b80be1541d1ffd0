"""Relative-pose benchmark on SuperGlue-style ``pairs_with_gt.txt`` files (e.g. ScanNet).

Protocol (SuperGlue's, with pycolmap as the estimator): features and mutual-NN matches with
the conf, keypoints in ORIGINAL pixels (the given K are for the stored images); relative pose
from pycolmap's essential matrix (LO-RANSAC, threshold in pixels of the stored images,
default 2 px: about SuperGlue's 1 px at 640x480 for ScanNet's 1296x968 frames); error of a
pair = max(rotation angle error, translation direction angle error), the latter ignoring the
sign of t (``min(e, 180 - e)``); failures count as infinite. Reported: AUC of the pose error
up to 5/10/20 degrees, plus the precision of matches (normalised symmetric epipolar
distance < 5e-4 under the true pose, SuperGlue's definition) and the mean match count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..extract import extract_features
from ..formats.features import FeaturesReader
from ..formats.matches import MatchesReader
from ..geometry import estimate_relative_pose
from ..match import match_features
from ..pairs import write_pairs
from ..progress import progress
from ..report.bench import write_bench_report
from .cache import conf_tag
from .datasets import read_pose_pairs
from .metrics import epipolar_errors, error_auc, pose_error
from .report import pose_table

logger = logging.getLogger("dift_sfm")

AUC_THRESHOLDS = (5, 10, 20)
EPIPOLAR_THRESHOLD = 5e-4


def run_pose_benchmark(
    conf: dict,
    pairs_path: Path,
    image_dir: Path,
    output: Path,
    threshold: float = 2.0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Run the benchmark; writes ``output/results.json`` and ``results.md``; returns results."""
    pairs = read_pose_pairs(pairs_path)
    if any(p.rot0 or p.rot1 for p in pairs):
        logger.warning("Some pairs of %s have non-zero rot0/rot1: images are described as "
                       "stored (not rotated upright); the geometry is evaluated in the stored "
                       "frame, where K and T_0to1 hold.", pairs_path)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    names = sorted({n for p in pairs for n in (p.name0, p.name1)})
    tag = conf_tag(conf)
    features, matches = output / f"features-{tag}.h5", output / f"matches-{tag}.h5"
    pairs_txt = output / "pairs.txt"
    write_pairs(pairs_txt, [(p.name0, p.name1) for p in pairs])
    extract_features(conf, image_dir, features, image_list=names, overwrite=overwrite)
    match_features(conf, pairs_txt, features, matches, overwrite=overwrite)

    records: list[dict[str, Any]] = []
    with FeaturesReader(features) as feats, MatchesReader(matches) as pair_matches:
        for p in progress(pairs, desc="pose eval", unit="pair"):
            kp0, kp1 = feats.keypoints(p.name0), feats.keypoints(p.name1)
            m, _ = pair_matches.matches(p.name0, p.name1)
            pts0, pts1 = kp0[m[:, 0]].astype(np.float64), kp1[m[:, 1]].astype(np.float64)
            res = estimate_relative_pose(pts0, pts1, p.K0, p.K1, threshold, seed)
            err_R, err_t = pose_error(res, p.R, p.t)
            epi = epipolar_errors(pts0, pts1, p.T_0to1, p.K0, p.K1)
            records.append({
                "name0": p.name0, "name1": p.name1, "rot0": p.rot0, "rot1": p.rot1,
                "num_keypoints0": len(kp0), "num_keypoints1": len(kp1), "num_matches": len(m),
                "precision": float(np.mean(epi < EPIPOLAR_THRESHOLD)) if len(m) else 0.0,
                "success": res.success, "reason": res.reason, "num_inliers": res.num_inliers,
                "error_R": err_R if np.isfinite(err_R) else None,
                "error_t": err_t if np.isfinite(err_t) else None,
            })
    errors = [max(r["error_R"], r["error_t"]) if r["success"] else np.inf for r in records]
    summary = {
        "num_pairs": len(records),
        "thresholds_deg": list(AUC_THRESHOLDS),
        "auc": error_auc(errors, AUC_THRESHOLDS),
        "precision": float(np.mean([r["precision"] for r in records])),
        "mean_num_matches": float(np.mean([r["num_matches"] for r in records])),
        "mean_num_keypoints": float(np.mean([r[f"num_keypoints{i}"] for r in records
                                             for i in (0, 1)])),
        "estimator": "pycolmap essential matrix", "threshold_px": threshold,
        "failures": int(sum(not r["success"] for r in records)),
    }
    results = {"conf": conf.get("name"), "conf_tag": tag, "pairs_file": str(pairs_path),
               "image_dir": str(image_dir), "files": {"features": str(features),
                                                      "matches": str(matches)},
               "summary": summary, "pairs": records}
    (output / "results.json").write_text(json.dumps(results, indent=1))
    table = pose_table(results)
    (output / "results.md").write_text(table)
    write_bench_report("pose", results, output)  # report.html; never raises
    logger.info("Wrote %s and results.md.", output / "results.json")
    return results
