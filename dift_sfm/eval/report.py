"""Tables (markdown) and plots of benchmark results, from the ``results`` dicts of
:func:`dift_sfm.eval.hpatches.run_hpatches` and :func:`dift_sfm.eval.pose.run_pose_benchmark`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..formats.features import FeaturesReader
from ..formats.matches import MatchesReader
from ..images import read_image
from ..viz import plot_matches
from .datasets import CATEGORIES
from .metrics import ACC_THRESHOLDS, MMA_THRESHOLDS, match_precision_mask


def _pct(values: list[float] | None) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values) if values else "-"


def hpatches_table(results: dict) -> str:
    """A markdown summary of HPatches ``results`` (from ``run_hpatches``)."""
    s = results["summary"]
    m = results.get("matcher") or {}
    matcher = f"{m.get('name', 'mnn')}/{m.get('metric', 'cosine')}" + (
        f", ratio {m['ratio_threshold']}" if m.get("ratio_threshold") else ", no ratio test")
    lines = [f"HPatches benchmark, conf `{results['conf']}` ({results['conf_tag']}), "
             f"matcher {matcher}, sequences: {', '.join(results['sequences'])}", "",
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


def hpatches_plots(results: dict, output: Path, base: Path, num_viz: int,
                   files: dict) -> None:
    """``mma.png``, ``accuracy.png`` and ``num_viz`` match plots ``matches_<seq>_1_<k>.png``."""
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
    with FeaturesReader(features) as feats, MatchesReader(matches) as pair_matches:
        kp0, kp1 = feats.keypoints(rec["name0"]), feats.keypoints(rec["name1"])
        m, _ = pair_matches.matches(rec["name0"], rec["name1"])
    im0, im1 = read_image(base / rec["name0"]), read_image(base / rec["name1"])
    # "inliers" here: matches within 3 px of the true H (green), the others red.
    ok = match_precision_mask(kp0[m[:, 0]], kp1[m[:, 1]], np.asarray(rec["H_gt"]))
    title = f"{rec['sequence']} 1-{rec['k']}, green: within 3 px of the true H;"
    plot_matches(im0, im1, kp0, kp1, m, path, inliers=ok, title=title)


def pose_table(results: dict) -> str:
    """A markdown row of relative-pose ``results`` (from ``run_pose_benchmark``)."""
    s = results["summary"]
    auc = " / ".join(f"{100 * a:.1f}" for a in s["auc"])
    return ("| conf | pairs | AUC % @5/10/20 deg | precision % | matches | keypoints |\n"
            "|---|---|---|---|---|---|\n"
            f"| {results['conf']} | {s['num_pairs']} | {auc} | {100 * s['precision']:.1f} | "
            f"{s['mean_num_matches']:.0f} | {s['mean_num_keypoints']:.0f} |\n")
