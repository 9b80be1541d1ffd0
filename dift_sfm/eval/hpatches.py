"""HPatches (and Oxford affine) homography benchmark in three protocols, with per-pair results.

Pairs are (1, k), k = 2..6, of every sequence (see :mod:`dift_sfm.eval.datasets`).

1. ``dift`` (DIFT / CAPS): full-resolution images, up to 1000 keypoints per image (or imported
   ones), mutual-NN matches, OpenCV ``findHomography`` (RANSAC with a 3 px threshold; LMEDS
   for the ``sd`` featurizer, as the DIFT paper did); a pair is correct at e px when the mean
   distance of image 1's four corners warped by the estimated and the true H is <= e.
   Accuracy at 1/3/5 px per category (illumination / viewpoint / all).
2. ``gluefactory``: images resized so the SHORT side is 480 px (resized copies are cached in
   the output folder; the true H is rescaled to that frame), up to 1024 keypoints, mutual NN,
   pycolmap LO-RANSAC (threshold 1 px by default, glue-factory's default; ``"auto"`` tries
   0.5..3 px and keeps the best, as glue-factory's ``ransac_th=-1``); AUC of the mean corner
   error up to 1/3/5 px, failures counting as infinite errors.
3. ``mma`` (D2-Net): on the full-resolution matches of protocol 1, the share of matches whose
   keypoint in image 1 warped by the true H lands within e px of its match in image k,
   e = 1..10, averaged over pairs (a pair without matches scores 0); plus the mean number of
   matches per pair and keypoints per image.

Features and matches are cached as hloc h5 files under the output folder, one pair of files
per conf and resolution (the file name carries a hash of the conf), so an interrupted run
resumes where it stopped. Outputs: ``results.json`` (summary + per-pair), ``results.md``,
``mma.png``, ``accuracy.png``, ``matches_*.png``.

This module runs the protocols; the metrics are in :mod:`.metrics`, the cached files
(resized images, conf tags) in :mod:`.cache`, tables and plots in :mod:`.report`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DiftSfmError
from ..extract import extract_features
from ..featurizers import get_featurizer
from ..formats.features import FeaturesReader
from ..formats.matches import MatchesReader
from ..geometry import HOMOGRAPHY_METHODS, estimate_homography, scale_homography
from ..match import match_features
from ..pairs import write_pairs
from ..progress import progress
from ..report.bench import write_bench_report
from . import PROTOCOLS
from .cache import conf_tag, resize_short_side, resized_name, write_scaled_keypoints
from .datasets import CATEGORIES, HomographyPair, common_base, find_sequences, homography_pairs
from .metrics import ACC_THRESHOLDS, MMA_THRESHOLDS, corner_error, error_auc, match_precision
from .report import hpatches_plots, hpatches_table

logger = logging.getLogger("dift_sfm")

GF_AUTO_THRESHOLDS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)

#: Protocol settings (the DIFT-protocol estimator defaults per conf: :func:`default_estimator`).
default_conf: dict[str, Any] = {
    "dift": {"max_keypoints": 1000, "threshold": 3.0},
    "gluefactory": {"short_side": 480, "max_keypoints": 1024, "estimator": "pycolmap",
                    "threshold": 1.0},
    "num_viz": 4,
}


def default_estimator(conf: dict) -> str:
    """The DIFT-protocol estimator for a conf: LMEDS for DIFT-SD (the paper's), else RANSAC."""
    return "lmeds" if conf["featurizer"]["name"] == "sd" else "ransac"


#: The protocols' own matcher: plain mutual NN (the conf's metric), as in the DIFT paper,
#: whatever ratio test or threshold the conf uses elsewhere; stated in the results.
PROTOCOL_MATCHER = {"ratio_threshold": None, "min_score": None}


def protocol_conf(conf: dict, max_keypoints: int | None, keypoints_path: Path | None) -> dict:
    """The conf of a protocol: full-resolution input (no resize_max, detect_max or reduced
    decode), the protocols' matcher
    (``PROTOCOL_MATCHER``), and either ``max_keypoints`` detected keypoints or keypoints
    imported from ``keypoints_path``."""
    conf = copy.deepcopy(conf)
    conf.setdefault("preprocessing", {}).update(resize_max=None, detect_max=None,
                                                reduced_decode=None)
    conf["matcher"] = {**conf["matcher"], **PROTOCOL_MATCHER}
    if keypoints_path is not None:
        conf["keypoints"] = {"name": "import", "path": str(keypoints_path),
                             "max_keypoints": max_keypoints}
    elif max_keypoints is not None:
        conf["keypoints"]["max_keypoints"] = max_keypoints
    return conf


class LazyFeaturizer:
    """Builds the featurizer of ``conf`` on first use, so that the protocols share one model
    (loading a diffusion model takes seconds) and a fully cached run loads none."""

    def __init__(self, conf: dict):
        self._conf, self._featurizer = conf, None

    def __getattr__(self, name: str):
        if self._featurizer is None:
            self._featurizer = get_featurizer(self._conf)
        return getattr(self._featurizer, name)


def _features_and_matches(conf: dict, image_dir: Path, names: list[str],
                          pairs: list[tuple[str, str]], output: Path, label: str,
                          overwrite: bool, featurizer=None) -> tuple[Path, Path]:
    tag = conf_tag(conf)
    features = output / f"features-{tag}-{label}.h5"
    matches = output / f"matches-{tag}-{label}.h5"
    pairs_path = output / f"pairs-{label}.txt"
    write_pairs(pairs_path, pairs)
    (output / f"conf-{tag}-{label}.json").write_text(json.dumps(conf, indent=2, default=str))
    extract_features(conf, image_dir, features, image_list=names, overwrite=overwrite,
                     featurizer=featurizer)
    match_features(conf, pairs_path, features, matches, overwrite=overwrite)
    return features, matches


def _matched_points(features: FeaturesReader, matches: MatchesReader, name0: str, name1: str):
    kp0, kp1 = features.keypoints(name0), features.keypoints(name1)
    m, _ = matches.matches(name0, name1)
    return kp0, kp1, m, kp0[m[:, 0]].astype(np.float64), kp1[m[:, 1]].astype(np.float64)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _by_category(records: list[dict], value) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in CATEGORIES}
    for r in records:
        v = value(r)
        out[r["category"]].append(v)
        out["all"].append(v)
    return out


def _eval_full(pairs: list[HomographyPair], features: FeaturesReader, matches: MatchesReader,
               protocols, estimator, threshold, seed) -> list[dict]:
    records = []
    for p in progress(pairs, desc="hpatches eval (full res)", unit="pair"):
        kp0, kp1, m, pts0, pts1 = _matched_points(features, matches, p.name0, p.name1)
        rec: dict[str, Any] = {"num_keypoints0": len(kp0), "num_keypoints1": len(kp1),
                               "num_matches": len(m)}
        if "dift" in protocols:
            res = estimate_homography(pts0, pts1, estimator, threshold, seed)
            err = corner_error(res.H, p.H, features.image_size(p.name0))
            rec["dift"] = {"corner_error": _finite(err), "success": res.success,
                           "reason": res.reason, "num_inliers": res.num_inliers,
                           "correct": [bool(err <= t) for t in ACC_THRESHOLDS],
                           "H": None if res.H is None else res.H.tolist()}
        if "mma" in protocols:
            rec["mma"] = match_precision(pts0, pts1, p.H)
        records.append(rec)
    return records


def _eval_gluefactory(pairs: list[HomographyPair], features: FeaturesReader,
                      matches: MatchesReader,
                      scales: dict[str, tuple[float, float]], estimator: str,
                      thresholds: list[float], seed: int) -> tuple[list[dict], float]:
    """Per-pair records at the best of ``thresholds`` (by mean AUC) and that threshold."""
    per_thr: dict[float, list[dict]] = {t: [] for t in thresholds}
    for p in progress(pairs, desc="hpatches eval (short side)", unit="pair"):
        n0, n1 = resized_name(p.name0), resized_name(p.name1)
        kp0, kp1, m, pts0, pts1 = _matched_points(features, matches, n0, n1)
        H_gt = scale_homography(p.H, scales[p.name0], scales[p.name1])
        size0 = features.image_size(n0)
        for t in thresholds:
            res = estimate_homography(pts0, pts1, estimator, t, seed)
            err = corner_error(res.H, H_gt, size0)
            per_thr[t].append({
                "num_keypoints0": len(kp0), "num_keypoints1": len(kp1), "num_matches": len(m),
                "image_size0": list(size0), "H_gt": H_gt.tolist(),
                "corner_error": _finite(err), "success": res.success, "reason": res.reason,
                "num_inliers": res.num_inliers, "threshold": t})

    def score(t):
        errs = [r["corner_error"] if r["corner_error"] is not None else np.inf
                for r in per_thr[t]]
        return float(np.mean(error_auc(errs, ACC_THRESHOLDS)))

    best = max(thresholds, key=score)  # first of equals
    return per_thr[best], best


def summarize_results(records: list[dict], protocols,
                      num_keypoints: dict[str, dict[str, int]]) -> dict:
    """Summary metrics per category from per-pair ``records`` (see :func:`run_hpatches`)."""
    counts = {c: len(v) for c, v in _by_category(records, lambda r: 1).items()}
    summary: dict[str, Any] = {"num_pairs": counts}
    if "dift" in protocols:
        correct = _by_category(records, lambda r: r["dift"]["correct"])
        summary["dift"] = {
            "thresholds_px": list(ACC_THRESHOLDS),
            "accuracy": {c: (np.mean(v, 0).tolist() if v else None) for c, v in correct.items()},
            "mean_num_matches": {c: (float(np.mean(v)) if v else None) for c, v in
                                 _by_category(records, lambda r: r["num_matches"]).items()},
            "mean_num_inliers": {c: (float(np.mean(v)) if v else None) for c, v in
                                 _by_category(records,
                                              lambda r: r["dift"]["num_inliers"]).items()},
        }
    if "mma" in protocols:
        mma = _by_category(records, lambda r: r["mma"])
        summary["mma"] = {
            "thresholds_px": list(MMA_THRESHOLDS),
            "mma": {c: (np.mean(v, 0).tolist() if v else None) for c, v in mma.items()},
            "mean_num_matches": {c: (float(np.mean(v)) if v else None) for c, v in
                                 _by_category(records, lambda r: r["num_matches"]).items()},
            "mean_num_keypoints": _mean_keypoints(records, num_keypoints.get("full", {})),
        }
    if "gluefactory" in protocols:
        errs = _by_category(records, lambda r: (r["gluefactory"]["corner_error"]
                                                if r["gluefactory"]["corner_error"] is not None
                                                else np.inf))
        summary["gluefactory"] = {
            "thresholds_px": list(ACC_THRESHOLDS),
            "auc": {c: (error_auc(v, ACC_THRESHOLDS) if v else None) for c, v in errs.items()},
            "mean_num_matches": {c: (float(np.mean(v)) if v else None) for c, v in
                                 _by_category(records,
                                              lambda r: r["gluefactory"]["num_matches"]).items()},
            "mean_num_keypoints": _mean_keypoints(records, num_keypoints.get("short", {})),
        }
    return summary


def _mean_keypoints(records: list[dict], counts: dict[str, int]) -> dict[str, float | None]:
    """Mean keypoints per image (each image of the evaluated pairs counted once)."""
    images: dict[str, set[str]] = {c: set() for c in CATEGORIES}
    for r in records:
        for name in (r["name0"], r["name1"]):
            if name in counts:
                images[r["category"]].add(name)
                images["all"].add(name)
    return {c: (float(np.mean([counts[n] for n in v])) if v else None) for c, v in images.items()}


def run_hpatches(
    conf: dict,
    roots: Path | list[Path],
    output: Path,
    protocols: tuple[str, ...] | list[str] = PROTOCOLS,
    subset: str = "full",
    max_keypoints: int | None = None,
    keypoints_from: Path | None = None,
    estimator: str | None = None,
    threshold: float | None = None,
    gf_threshold: float | str | None = None,
    seed: int = 0,
    num_viz: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Run the benchmark; returns (and writes to ``output/results.json``) the results.

    Args:
        conf: a named conf (``dift_sfm.confs.get_conf``).
        roots: folders of sequences (HPatches release, Oxford affine) or single sequences.
        protocols: any of ``dift``, ``gluefactory``, ``mma``.
        subset: ``full`` or ``108`` (drops the 8 sequences with images over 1600x1200).
        max_keypoints: per image (default 1000 at full resolution, 1024 at short side 480;
            imported keypoints: all of them).
        keypoints_from: an hloc features file whose keypoints (original pixels of images named
            like ``<sequence>/1.ppm`` relative to the common root) are described instead.
        estimator, threshold: the DIFT-protocol estimator (default per conf) and threshold.
        gf_threshold: glue-factory-protocol pycolmap threshold (px), or ``"auto"``.
    """
    protocols = tuple(protocols)
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise DiftSfmError(f"Unknown protocol(s) {sorted(unknown)}; use {', '.join(PROTOCOLS)}.")
    estimator = estimator or default_estimator(conf)
    if estimator not in HOMOGRAPHY_METHODS:
        raise DiftSfmError(f"Unknown estimator '{estimator}'; use {', '.join(HOMOGRAPHY_METHODS)}.")
    threshold = default_conf["dift"]["threshold"] if threshold is None else float(threshold)
    gf = default_conf["gluefactory"]
    gf_threshold = gf["threshold"] if gf_threshold is None else gf_threshold
    gf_thresholds = (list(GF_AUTO_THRESHOLDS) if str(gf_threshold) == "auto"
                     else [float(gf_threshold)])
    num_viz = default_conf["num_viz"] if num_viz is None else num_viz
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    keypoints_from = Path(keypoints_from) if keypoints_from else None
    if keypoints_from is not None and not keypoints_from.is_file():
        raise DiftSfmError(f"Keypoints file {keypoints_from} does not exist.")

    sequences = find_sequences(roots, subset)
    base = common_base(sequences)
    pairs = homography_pairs(sequences, base)
    if not pairs:
        raise DiftSfmError(f"No (1, k) pairs with ground truth found in {roots}.")
    logger.info("HPatches benchmark: %d sequences, %d pairs, protocols %s, conf %s.",
                len(sequences), len(pairs), ",".join(protocols), conf.get("name"))
    names = sorted({n for p in pairs for n in (p.name0, p.name1)})
    name_pairs = [(p.name0, p.name1) for p in pairs]
    records = [{"sequence": p.sequence, "category": p.category, "k": p.k, "name0": p.name0,
                "name1": p.name1, "H_gt": p.H.tolist()} for p in pairs]
    num_keypoints: dict[str, dict[str, int]] = {}
    files: dict[str, str] = {}
    full_kpts = None if keypoints_from else default_conf["dift"]["max_keypoints"]
    fconf = protocol_conf(conf, max_keypoints or full_kpts, keypoints_from)
    featurizer = LazyFeaturizer(conf["featurizer"])  # the protocols differ in keypoints only

    if "dift" in protocols or "mma" in protocols:
        feats, matches = _features_and_matches(fconf, base, names, name_pairs, output, "full",
                                               overwrite, featurizer)
        files.update(features_full=str(feats), matches_full=str(matches))
        with FeaturesReader(feats) as f, MatchesReader(matches) as m:
            num_keypoints["full"] = {n: len(f.keypoints(n)) for n in names}
            full = _eval_full(pairs, f, m, protocols, estimator, threshold, seed)
        for rec, extra in zip(records, full, strict=True):
            rec.update(extra)

    gf_best = None
    if "gluefactory" in protocols:
        cache = output / f"images-short{gf['short_side']}"
        scales = {n: resize_short_side(base / n, cache / resized_name(n), gf["short_side"])
                  for n in progress(names, desc="resize", unit="img")}
        import_path = None
        if keypoints_from is not None:
            import_path = write_scaled_keypoints(
                keypoints_from, output / f"keypoints-import-short{gf['short_side']}.h5",
                {n: resized_name(n) for n in names}, scales)
        short_kpts = None if keypoints_from else gf["max_keypoints"]
        gconf = protocol_conf(conf, max_keypoints or short_kpts, import_path)
        rnames = [resized_name(n) for n in names]
        rpairs = [(resized_name(a), resized_name(b)) for a, b in name_pairs]
        feats, matches = _features_and_matches(gconf, cache, rnames, rpairs, output,
                                               f"short{gf['short_side']}", overwrite, featurizer)
        files.update(features_short=str(feats), matches_short=str(matches))
        with FeaturesReader(feats) as f, MatchesReader(matches) as m:
            num_keypoints["short"] = {n: len(f.keypoints(resized_name(n))) for n in names}
            gf_records, gf_best = _eval_gluefactory(pairs, f, m, scales, gf["estimator"],
                                                    gf_thresholds, seed)
        for rec, extra in zip(records, gf_records, strict=True):
            rec["gluefactory"] = extra

    summary = summarize_results(records, protocols, num_keypoints)
    summary["per_sequence"] = {
        seq.name: summarize_results([r for r in records if r["sequence"] == seq.name], protocols,
                                    num_keypoints)
        for seq in sequences if any(r["sequence"] == seq.name for r in records)}
    if "dift" in protocols:
        summary["dift"].update(estimator=estimator, threshold_px=(
            None if estimator == "lmeds" else threshold))
    if "gluefactory" in protocols:
        summary["gluefactory"].update(short_side=gf["short_side"], estimator=gf["estimator"],
                                      threshold_px=gf_best, thresholds_tried=gf_thresholds)
    results = {
        "conf": conf.get("name"), "conf_tag": conf_tag(fconf), "protocols": list(protocols),
        "matcher": fconf["matcher"],
        "subset": subset, "roots": [str(r) for r in ([roots] if isinstance(roots, (str, Path))
                                                      else roots)],
        "image_root": str(base), "sequences": [s.name for s in sequences],
        "files": files, "summary": summary, "pairs": records,
    }
    (output / "results.json").write_text(json.dumps(results, indent=1))
    table = hpatches_table(results)
    (output / "results.md").write_text(table)
    hpatches_plots(results, output, base, num_viz, files)
    write_bench_report("hpatches", results, output)  # report.html; never raises
    logger.info("Wrote %s, results.md and plots.", output / "results.json")
    return results
