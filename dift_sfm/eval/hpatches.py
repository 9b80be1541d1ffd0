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
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

from ..errors import DiftSfmError
from ..extract import extract_features
from ..featurizers import get_featurizer
from ..formats.features import feature_datasets, read_image_size, read_keypoints, read_scores
from ..formats.matches import read_matches
from ..geometry import (
    HOMOGRAPHY_METHODS,
    corner_error,
    error_auc,
    estimate_homography,
    scale_homography,
    warp_points,
)
from ..match import match_features
from ..pairs import write_pairs
from ..progress import progress
from .datasets import HomographyPair, common_base, find_sequences, homography_pairs

logger = logging.getLogger("dift_sfm")

PROTOCOLS = ("dift", "gluefactory", "mma")
CATEGORIES = ("illumination", "viewpoint", "all")
ACC_THRESHOLDS = (1, 3, 5)
MMA_THRESHOLDS = tuple(range(1, 11))
GF_AUTO_THRESHOLDS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)

default_conf: dict[str, Any] = {
    "subset": "full",
    "dift": {"max_keypoints": 1000, "estimator": None, "threshold": 3.0},
    "gluefactory": {"short_side": 480, "max_keypoints": 1024, "estimator": "pycolmap",
                    "threshold": 1.0},
    "seed": 0,
    "num_viz": 4,
}


def default_estimator(conf: dict) -> str:
    """The DIFT-protocol estimator for a conf: LMEDS for DIFT-SD (the paper's), else RANSAC."""
    return "lmeds" if conf["featurizer"]["name"] == "sd" else "ransac"


def conf_tag(conf: dict) -> str:
    """``<conf name>-<8 hex>``: a hash of everything that changes the features or matches."""
    keys = ("preprocessing", "keypoints", "featurizer", "matcher", "pca")
    blob = json.dumps({k: conf.get(k) for k in keys}, sort_keys=True, default=str)
    return f"{conf.get('name', 'conf')}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def protocol_conf(conf: dict, max_keypoints: int | None, keypoints_path: Path | None) -> dict:
    """The feature conf of a protocol: full-resolution input (no resize_max), and either
    ``max_keypoints`` detected keypoints or keypoints imported from ``keypoints_path``."""
    conf = copy.deepcopy(conf)
    conf.setdefault("preprocessing", {})["resize_max"] = None
    if keypoints_path is not None:
        conf["keypoints"] = {"name": "import", "path": str(keypoints_path),
                             "max_keypoints": max_keypoints}
    elif max_keypoints is not None:
        conf["keypoints"]["max_keypoints"] = max_keypoints
    return conf


def resized_name(name: str) -> str:
    """Name of the resized copy of image ``name`` (PNG, same folders)."""
    return str(Path(name).with_suffix(".png").as_posix())


def resize_short_side(src: Path, dst: Path, short_side: int) -> tuple[float, float]:
    """Write ``src`` resized so its short side is ``short_side`` px to ``dst`` (PNG, skipped
    when an up-to-date copy exists). Returns the scale (sx, sy) = new / old size."""
    image = cv2.imread(str(src), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise DiftSfmError(f"Could not read image {src}.")
    h, w = image.shape[:2]
    ratio = short_side / min(h, w)
    nw, nh = max(1, round(w * ratio)), max(1, round(h * ratio))
    if dst.exists():
        old = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
        if old is not None and old.shape[:2] == (nh, nw):
            return nw / w, nh / h
    interp = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.stem + ".tmp.png")
    if not cv2.imwrite(str(tmp), resized):
        raise DiftSfmError(f"Could not write resized image {tmp}.")
    tmp.replace(dst)
    return nw / w, nh / h


def write_scaled_keypoints(src: Path, dst: Path, names: dict[str, str],
                           scales: dict[str, tuple[float, float]]) -> Path:
    """Copy the keypoints of ``names`` (src name -> dst name) from the hloc features file
    ``src`` into ``dst``, mapped into resized frames (x' = (x + 0.5) * s - 0.5)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, new in names.items():
            s = np.asarray(scales[name], np.float32)
            xy = (read_keypoints(src, name) + 0.5) * s - 0.5
            w, h = read_image_size(src, name)
            data = feature_datasets(xy, np.zeros((len(xy), 0), np.float32),
                                    read_scores(src, name),
                                    (round(w * s[0]), round(h * s[1])))
            group = f.require_group(new)
            for key, value in data.items():
                group.create_dataset(key, data=value)
    tmp.replace(dst)
    return dst


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


def _matched_points(features: Path, matches: Path, name0: str, name1: str):
    kp0, kp1 = read_keypoints(features, name0), read_keypoints(features, name1)
    m, _ = read_matches(matches, name0, name1)
    return kp0, kp1, m, kp0[m[:, 0]].astype(np.float64), kp1[m[:, 1]].astype(np.float64)


def match_precision(pts0: np.ndarray, pts1: np.ndarray, H: np.ndarray,
                    thresholds=MMA_THRESHOLDS) -> list[float]:
    """Share of matches (pts0[i], pts1[i]) with |H pts0[i] - pts1[i]| <= e, per threshold e
    (D2-Net's MMA of one pair; 0 for no matches)."""
    if len(pts0) == 0:
        return [0.0 for _ in thresholds]
    dist = np.linalg.norm(warp_points(H, pts0) - pts1, axis=1)
    dist = np.where(np.isfinite(dist), dist, np.inf)
    return [float(np.mean(dist <= t)) for t in thresholds]


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _by_category(records: list[dict], value) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in CATEGORIES}
    for r in records:
        v = value(r)
        out[r["category"]].append(v)
        out["all"].append(v)
    return out


def _eval_full(pairs: list[HomographyPair], features: Path, matches: Path, protocols, estimator,
               threshold, seed) -> list[dict]:
    records = []
    for p in progress(pairs, desc="hpatches eval (full res)", unit="pair"):
        kp0, kp1, m, pts0, pts1 = _matched_points(features, matches, p.name0, p.name1)
        rec: dict[str, Any] = {"num_keypoints0": len(kp0), "num_keypoints1": len(kp1),
                               "num_matches": len(m)}
        if "dift" in protocols:
            res = estimate_homography(pts0, pts1, estimator, threshold, seed)
            err = corner_error(res.H, p.H, read_image_size(features, p.name0))
            rec["dift"] = {"corner_error": _finite(err), "success": res.success,
                           "reason": res.reason, "num_inliers": res.num_inliers,
                           "correct": [bool(err <= t) for t in ACC_THRESHOLDS],
                           "H": None if res.H is None else res.H.tolist()}
        if "mma" in protocols:
            rec["mma"] = match_precision(pts0, pts1, p.H)
        records.append(rec)
    return records


def _eval_gluefactory(pairs: list[HomographyPair], features: Path, matches: Path,
                      scales: dict[str, tuple[float, float]], estimator: str,
                      thresholds: list[float], seed: int) -> tuple[list[dict], float]:
    """Per-pair records at the best of ``thresholds`` (by mean AUC) and that threshold."""
    per_thr: dict[float, list[dict]] = {t: [] for t in thresholds}
    for p in progress(pairs, desc="hpatches eval (short side)", unit="pair"):
        n0, n1 = resized_name(p.name0), resized_name(p.name1)
        kp0, kp1, m, pts0, pts1 = _matched_points(features, matches, n0, n1)
        H_gt = scale_homography(p.H, scales[p.name0], scales[p.name1])
        size0 = read_image_size(features, n0)
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


def summarize(records: list[dict], protocols, num_keypoints: dict[str, dict[str, int]]) -> dict:
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
        num_keypoints["full"] = {n: len(read_keypoints(feats, n)) for n in names}
        full = _eval_full(pairs, feats, matches, protocols, estimator, threshold, seed)
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
        num_keypoints["short"] = {n: len(read_keypoints(feats, resized_name(n))) for n in names}
        gf_records, gf_best = _eval_gluefactory(pairs, feats, matches, scales, gf["estimator"],
                                                gf_thresholds, seed)
        for rec, extra in zip(records, gf_records, strict=True):
            rec["gluefactory"] = extra

    summary = summarize(records, protocols, num_keypoints)
    summary["per_sequence"] = {
        seq.name: summarize([r for r in records if r["sequence"] == seq.name], protocols,
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
        "subset": subset, "roots": [str(r) for r in ([roots] if isinstance(roots, (str, Path))
                                                      else roots)],
        "image_root": str(base), "sequences": [s.name for s in sequences],
        "files": files, "summary": summary, "pairs": records,
    }
    (output / "results.json").write_text(json.dumps(results, indent=1))
    (output / "results.md").write_text(markdown_table(results))
    _plots(results, output, base, num_viz, files)
    logger.info("HPatches results:\n%s", markdown_table(results))
    logger.info("Wrote %s, results.md and plots.", output / "results.json")
    return results


def _pct(values: list[float] | None) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values) if values else "-"


def markdown_table(results: dict) -> str:
    """A markdown summary of ``results`` (from :func:`run_hpatches`)."""
    s = results["summary"]
    lines = [f"HPatches benchmark, conf `{results['conf']}` ({results['conf_tag']}), "
             f"sequences: {', '.join(results['sequences'])}", "",
             "| protocol | metric | illumination | viewpoint | all |", "|---|---|---|---|---|"]
    n = s["num_pairs"]
    lines.append(f"| - | pairs | {n['illumination']} | {n['viewpoint']} | {n['all']} |")
    if "dift" in s:
        d = s["dift"]
        est = d["estimator"] + ("" if d["threshold_px"] is None else f" {d['threshold_px']} px")
        lines.append(f"| dift ({est}) | accuracy % @1/3/5 px | "
                     + " | ".join(_pct(d["accuracy"][c]) for c in CATEGORIES) + " |")
    if "gluefactory" in s:
        g = s["gluefactory"]
        lines.append(f"| gluefactory (short side {g['short_side']}, {g['estimator']} "
                     f"{g['threshold_px']} px) | AUC % @1/3/5 px | "
                     + " | ".join(_pct(g["auc"][c]) for c in CATEGORIES) + " |")
        lines.append("| gluefactory | matches / keypoints | " + " | ".join(
            _counts(g, c) for c in CATEGORIES) + " |")
    if "mma" in s:
        m = s["mma"]
        lines.append("| mma | MMA % @1/3/5/10 px | " + " | ".join(
            _pct([m["mma"][c][i] for i in (0, 2, 4, 9)]) if m["mma"][c] else "-"
            for c in CATEGORIES) + " |")
        lines.append("| mma | matches / keypoints | " + " | ".join(
            _counts(m, c) for c in CATEGORIES) + " |")
    per_seq = s.get("per_sequence", {})
    if per_seq:
        lines += ["", "| sequence | pairs | dift accuracy % @1/3/5 | gluefactory AUC % @1/3/5 "
                  "| MMA % @1/3/5/10 |", "|---|---|---|---|---|"]
        for name, q in per_seq.items():
            acc = _pct(q["dift"]["accuracy"]["all"]) if "dift" in q else "-"
            auc = _pct(q["gluefactory"]["auc"]["all"]) if "gluefactory" in q else "-"
            mma = (_pct([q["mma"]["mma"]["all"][i] for i in (0, 2, 4, 9)]) if "mma" in q
                   else "-")
            lines.append(f"| {name} | {q['num_pairs']['all']} | {acc} | {auc} | {mma} |")
    return "\n".join(lines) + "\n"


def _counts(section: dict, c: str) -> str:
    m, k = section["mean_num_matches"][c], section["mean_num_keypoints"][c]
    return "-" if m is None or k is None else f"{m:.0f} / {k:.0f}"


def _plots(results: dict, output: Path, base: Path, num_viz: int, files: dict) -> None:
    from matplotlib.figure import Figure

    s = results["summary"]
    colours = {"illumination": "tab:orange", "viewpoint": "tab:blue", "all": "k"}
    if "mma" in s:
        fig = Figure(figsize=(5, 4))
        ax = fig.add_subplot()
        for c in CATEGORIES:
            if s["mma"]["mma"][c]:
                ax.plot(MMA_THRESHOLDS, s["mma"]["mma"][c], "-o", ms=3, c=colours[c], label=c)
        ax.set(xlabel="threshold [px]", ylabel="MMA", ylim=(0, 1), xlim=(1, 10),
               title=f"MMA, {results['conf']}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output / "mma.png", dpi=100)
    bars = [(k, s[k]["accuracy" if k == "dift" else "auc"]) for k in ("dift", "gluefactory")
            if k in s]
    if bars:
        fig = Figure(figsize=(5 * len(bars), 4))
        for i, (key, values) in enumerate(bars):
            ax = fig.add_subplot(1, len(bars), i + 1)
            x = np.arange(len(ACC_THRESHOLDS))
            for j, c in enumerate(CATEGORIES):
                if values[c]:
                    ax.bar(x + (j - 1) * 0.27, values[c], 0.27, color=colours[c], label=c)
            ax.set_xticks(x, [f"{t} px" for t in ACC_THRESHOLDS])
            ax.set(ylim=(0, 1), title=f"{key}: {'accuracy' if key == 'dift' else 'AUC'}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(output / "accuracy.png", dpi=100)
    if num_viz and "features_full" in files:
        pairs = results["pairs"]
        pick = np.unique(np.linspace(0, len(pairs) - 1, min(num_viz, len(pairs))).astype(int))
        for i in pick:
            _plot_pair(pairs[i], base, Path(files["features_full"]), Path(files["matches_full"]),
                       output / f"matches_{pairs[i]['sequence']}_1_{pairs[i]['k']}.png")


def _plot_pair(rec: dict, base: Path, features: Path, matches: Path, path: Path) -> None:
    from ..images import read_image
    from ..viz import plot_matches

    kp0, kp1 = read_keypoints(features, rec["name0"]), read_keypoints(features, rec["name1"])
    m, _ = read_matches(matches, rec["name0"], rec["name1"])
    im0, im1 = read_image(base / rec["name0"]), read_image(base / rec["name1"])
    # "inliers" here: matches within 3 px of the true H (green), the others red.
    ok = match_precision_mask(kp0[m[:, 0]], kp1[m[:, 1]], np.asarray(rec["H_gt"]))
    title = f"{rec['sequence']} 1-{rec['k']}, green: within 3 px of the true H;"
    plot_matches(im0, im1, kp0, kp1, m, path, inliers=ok, title=title)


def match_precision_mask(pts0: np.ndarray, pts1: np.ndarray, H: np.ndarray,
                         threshold: float = 3.0) -> np.ndarray:
    """(M,) bool: matches whose image-0 point warped by ``H`` is within ``threshold`` px."""
    if len(pts0) == 0:
        return np.zeros(0, bool)
    dist = np.linalg.norm(warp_points(H, pts0) - np.asarray(pts1, float), axis=1)
    return np.isfinite(dist) & (dist <= threshold)
