"""``report.html`` of the benchmarks: curves and the per-pair table, from a ``results`` dict.

HPatches (``run_hpatches``): MMA curve, DIFT-protocol accuracy and glue-factory AUC per
category, per-pair table linking to the ``matches_*.png`` plots the run wrote. Pose benchmark
(``run_pose_benchmark``): the share of pairs under each pose error (the AUC's curve) and the
per-pair table. Built from the results alone (JSON-like dicts, as in ``results.json``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .html import Page, esc, table

logger = logging.getLogger("dift_sfm")

__all__ = ["hpatches_page", "pose_page", "write_bench_report"]

REPORT_FILE = "report.html"
_COLOURS = {"illumination": "#ff7f0e", "viewpoint": "#1f77b4", "all": "#222"}

# A click on a header sorts that table by the column (numbers numerically).
_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th,col){
 th.style.cursor='pointer';th.title='sort';
 th.addEventListener('click',function(){
  var body=th.closest('table').tBodies[0],rows=[].slice.call(body.rows),up=th.dataset.up!=='1';
  th.dataset.up=up?'1':'0';
  function key(r){var t=r.cells[col].textContent,n=parseFloat(t);return isNaN(n)?t:n;}
  rows.sort(function(a,b){var x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*(up?1:-1);});
  rows.forEach(function(r){body.appendChild(r);});});});
"""


def _pct(values: list[float] | None) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values) if values else "-"


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _sortable(html: str) -> str:
    return html.replace("<table>", "<table class=sortable>", 1)


def _curves(title: str, xs: list[float], series: dict[str, list[float] | None], xlabel: str,
            ylabel: str, step: bool = False):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, ys in series.items():
        if ys:
            fig.add_trace(go.Scatter(x=list(xs), y=[100 * y for y in ys],
                                     mode="lines" if step else "lines+markers", name=name,
                                     line=dict(color=_COLOURS.get(name),
                                               shape="hv" if step else "linear")))
    fig.update_layout(title=dict(text=title, x=0.01), margin=dict(l=50, r=10, t=40, b=40),
                      legend=dict(orientation="h", x=0, y=0.02, bgcolor="rgba(255,255,255,0.7)"),
                      xaxis=dict(title=dict(text=xlabel)),
                      yaxis=dict(title=dict(text=ylabel), range=[0, 100]))
    return fig


def hpatches_page(results: dict, output: Path) -> Page:
    """The HPatches page of ``results``; match plots found in ``output`` are linked."""
    s = results["summary"]
    page = Page(f"HPatches benchmark: {results.get('conf')}",
                f"conf tag {esc(results.get('conf_tag'))}; protocols "
                f"{esc(', '.join(results.get('protocols', [])))}; "
                f"{len(results.get('sequences', []))} sequences, {len(results['pairs'])} pairs")
    cats = list(s["num_pairs"])
    rows = [("pairs", *[s["num_pairs"][c] for c in cats])]
    if "dift" in s:
        rows.append(("dift accuracy % @1/3/5 px", *[_pct(s["dift"]["accuracy"][c]) for c in cats]))
    if "gluefactory" in s:
        rows.append(("gluefactory AUC % @1/3/5 px", *[_pct(s["gluefactory"]["auc"][c])
                                                      for c in cats]))
    if "mma" in s:
        rows.append(("MMA % @1/3/5/10 px", *[
            _pct([s["mma"]["mma"][c][i] for i in (0, 2, 4, 9)]) if s["mma"]["mma"][c] else "-"
            for c in cats]))
    figs = []
    if "mma" in s:
        figs.append(page.add_figure(_curves("MMA", s["mma"]["thresholds_px"], s["mma"]["mma"],
                                            "threshold [px]", "MMA %"), "fig small"))
    if "dift" in s:
        figs.append(page.add_figure(_curves(
            f"dift protocol ({s['dift'].get('estimator', '')}): accuracy",
            s["dift"]["thresholds_px"], s["dift"]["accuracy"], "corner error [px]",
            "accuracy %"), "fig small"))
    if "gluefactory" in s:
        figs.append(page.add_figure(_curves("gluefactory protocol: AUC",
                                            s["gluefactory"]["thresholds_px"],
                                            s["gluefactory"]["auc"], "corner error [px]",
                                            "AUC %"), "fig small"))
    page.section("summary", "Summary",
                 table(["", *cats], rows) + f"<div class=figs>{''.join(figs)}</div>")

    header = ["sequence", "k", "category", "matches", "dift inliers", "dift corner error [px]",
              "gluefactory corner error [px]", "MMA % @3 px", "plot"]
    body = []
    for r in results["pairs"]:
        plot = output / f"matches_{r['sequence']}_1_{r['k']}.png"
        link = f'<a href="{esc(plot.name)}">png</a>' if plot.is_file() else ""
        d, g = r.get("dift") or {}, r.get("gluefactory") or {}
        body.append([esc(r["sequence"]), r["k"], esc(r["category"]), r.get("num_matches", "-"),
                     d.get("num_inliers", "-"), _num(d.get("corner_error")),
                     _num(g.get("corner_error")),
                     f"{100 * r['mma'][2]:.1f}" if r.get("mma") else "-", link])
    page.section("pairs", f"Pairs ({len(body)})",
                 "<p class=muted>Click a header to sort.</p>" + _sortable(table(
                     header, body, numeric=[False, True, False, True, True, True, True, True,
                                            False], raw=True)))
    page.add_script(_SORT_JS)
    return page


def pose_page(results: dict, output: Path) -> Page:
    """The relative-pose benchmark page of ``results``."""
    s = results["summary"]
    page = Page(f"Relative pose benchmark: {results.get('conf')}",
                f"pairs file {esc(results.get('pairs_file'))}; estimator "
                f"{esc(s.get('estimator'))}, threshold {esc(s.get('threshold_px'))} px")
    thresholds = s.get("thresholds_deg", [5, 10, 20])
    rows = [("pairs", s["num_pairs"]),
            (f"AUC % @{'/'.join(str(t) for t in thresholds)} deg", _pct(s["auc"])),
            ("match precision %", f"{100 * s['precision']:.1f}"),
            ("matches / keypoints", f"{s['mean_num_matches']:.0f} / "
                                    f"{s['mean_num_keypoints']:.0f}"),
            ("failures", s.get("failures", "-"))]
    errors = np.sort([max(r["error_R"], r["error_t"]) if r["success"] else np.inf
                      for r in results["pairs"]])
    top = float(max(thresholds))
    shown = errors[errors <= top]  # the recall curve whose area up to t is the AUC @t
    xs = [0.0, *shown.round(3).tolist(), top]
    recall = [0.0, *(np.arange(1, len(shown) + 1) / max(len(errors), 1)).tolist(),
              len(shown) / max(len(errors), 1)]
    fig = _curves("pairs under a pose error", xs, {"all": recall},
                  "pose error, max(R, t) [deg]", "pairs %", step=True)
    page.section("summary", "Summary", table(["", ""], rows, numeric=[False, True])
                 + page.add_figure(fig, "fig small"))
    header = ["image 0", "image 1", "matches", "inliers", "precision %", "R error [deg]",
              "t error [deg]", "result"]
    body = [[r["name0"], r["name1"], r["num_matches"], r.get("num_inliers", "-"),
             f"{100 * r['precision']:.1f}", _num(r.get("error_R")), _num(r.get("error_t")),
             "ok" if r["success"] else (r.get("reason") or "failed")]
            for r in results["pairs"]]
    page.section("pairs", f"Pairs ({len(body)})", "<p class=muted>Click a header to sort.</p>"
                 + _sortable(table(header, body, numeric=[False, False, True, True, True, True,
                                                          True, False])))
    page.add_script(_SORT_JS)
    return page


def write_bench_report(kind: str, results: dict, output: Path | str) -> Path | None:
    """Write ``output/report.html`` for ``kind`` (``hpatches`` or ``pose``); never raises: a
    failure is a warning (the results files are the product)."""
    output = Path(output)
    try:
        page = {"hpatches": hpatches_page, "pose": pose_page}[kind](results, output)
        path = page.write(output / REPORT_FILE)
        logger.info("Report %s.", path)
        return path
    except Exception as err:  # noqa: BLE001 - the benchmark's results are kept either way
        logger.warning("Could not write the %s report in %s (results are kept): %s: %s", kind,
                       output, type(err).__name__, err)
        return None
