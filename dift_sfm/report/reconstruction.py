"""``report.html`` of a reconstruction: summary, unregistered images and why, 3D view, match
graph and pair browser, in one offline file.

``write_sfm_report`` builds it from files (model, database or h5 files, images for the
thumbnails). ``report_after_run`` is what ``reconstruct`` calls: it also stores the run's
summary (``summary.json``: timings, mapper, unreadable images) for a later ``dift-sfm report``,
and turns any error into a warning, so a report never fails a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from .graph import graph_figure
from .html import Page, esc, table
from .pairs import pair_browser, select_pairs
from .scene3d import scene_figure
from .sources import MIN_NUM_MATCHES, find_model, load_scene

logger = logging.getLogger("dift_sfm")

__all__ = ["SUMMARY_FILE", "report_after_run", "write_sfm_report"]

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"


def _summary_dict(summary: Any) -> dict:
    if summary is None:
        return {}
    if dataclasses.is_dataclass(summary):
        out = dataclasses.asdict(summary)
    else:
        out = dict(summary)
    out.setdefault("mapper", getattr(summary, "mapper", None) or "incremental")
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def write_sfm_report(model: Path | str, output: Path | str | None = None,
                     image_dir: Path | str | None = None, database: Path | str | None = None,
                     features: Path | str | None = None, matches: Path | str | None = None,
                     pairs: Path | str | None = None, summary: Any = None,
                     max_points: int = 200_000, thumb_size: int = 300,
                     max_edges: int = 20_000) -> Path:
    """Write the report of the model at ``model`` (a ``reconstruct`` output folder or a model
    folder) to ``output`` (default: ``report.html`` in the run's folder); returns its path.

    ``summary``: a ``ReconstructionSummary`` or dict (default: ``summary.json`` of the run's
    folder, if any). ``image_dir``: where the thumbnails come from (default: the one recorded
    in ``summary.json``; without it the pairs are drawn on grey boxes).
    """
    start = time.perf_counter()
    model_dir, sfm_dir = find_model(model)
    stored = sfm_dir / SUMMARY_FILE
    info = _summary_dict(summary)
    if not info and stored.is_file():
        info = json.loads(stored.read_text())
    if image_dir is None and info.get("image_dir"):
        image_dir = info["image_dir"]
    image_dir = Path(image_dir) if image_dir is not None else None
    failed = dict(info.get("failed_images") or {})
    data = load_scene(model_dir, database, features, matches, pairs, failed, max_points)
    output = Path(output) if output is not None else sfm_dir / REPORT_FILE

    page = Page(f"Reconstruction report: {sfm_dir.name}",
                f"model {esc(model_dir)}; inliers: {esc(data.inlier_source)}; "
                f"images: {esc(image_dir) if image_dir else 'not given (no thumbnails)'}")
    num_images = len(data.names) + len([n for n in failed if n not in data.names])
    verified = sum(p.verified for p in data.pairs)
    rows = [
        ("registered images", f"{len(data.views)} / {num_images}"),
        ("3D points", f"{data.num_points}" + (f" ({len(data.xyz)} drawn)"
                                               if len(data.xyz) < data.num_points else "")),
        ("mean track length", f"{data.mean_track_length:.3f}"),
        ("mean reprojection error", f"{data.mean_error:.3f} px"),
        (f"matched pairs / verified (>= {MIN_NUM_MATCHES} inliers)",
         f"{len(data.pairs)} / {verified}"),
    ]
    if "mean_observations_per_image" in info:
        rows.append(("observations per image", f"{info['mean_observations_per_image']:.1f}"))
    if "num_models" in info:
        rows.append(("models", str(info["num_models"])))
    rows.append(("mapper", str(info.get("mapper", "-"))))
    for stage, seconds in (info.get("timings") or {}).items():
        rows.append((f"time: {stage}", f"{seconds:.1f} s"))
    summary_html = table(["", ""], rows, numeric=[False, True])

    unreg = sorted(data.reasons.items())
    if unreg:
        unreg_html = (f"<p>{len(unreg)} image(s) not in the model.</p><div class=scroll>"
                      + table(["image", "reason"], unreg) + "</div>")
    else:
        unreg_html = "<p>Every image is registered.</p>"
    page.section("summary", "Summary", summary_html)
    page.section("unregistered", f"Not registered ({len(unreg)})", unreg_html)
    page.section("scene", "3D view",
                 "<p class=muted>Drag to orbit, scroll to zoom; the buttons colour the points "
                 "by track length, reprojection error or RGB colour. Red: camera frusta.</p>"
                 + page.add_figure(scene_figure(data), count="cameras"))
    page.section("graph", "Match graph",
                 "<p class=muted>Images as nodes (green: registered, placed where their "
                 "cameras are; red: not registered), verified pairs as edges, wider and darker "
                 "with more inliers.</p>"
                 + page.add_figure(graph_figure(data, max_edges), count="graph_nodes"))
    views = select_pairs(data) if data.pair_source is not None else []
    if views:
        pairs_html, pairs_js = pair_browser(data, views, image_dir, thumb_size)
        page.add_script(pairs_js)
    else:
        pairs_html = "<p class=muted>No matches given (no database.db, --features/--matches)."
    page.section("pairs", f"Pairs ({len(views)})", pairs_html)
    page.write(output)
    logger.info("Report %s (%.1f MB) written in %.1f s.", output, output.stat().st_size / 1e6,
                time.perf_counter() - start)
    return output


def report_after_run(sfm_dir: Path | str, image_dir: Path | str, summary: Any,
                     features: Path | str | None = None, matches: Path | str | None = None,
                     pairs: Path | str | None = None) -> Path | None:
    """Store ``summary.json`` and write ``sfm_dir/report.html``; never raises (a failure is
    logged as a warning: the reconstruction is the product, the report a view of it)."""
    sfm_dir = Path(sfm_dir)
    try:
        info = _summary_dict(summary)
        info.update(image_dir=str(Path(image_dir).resolve()),
                    features=str(features) if features else None,
                    matches=str(matches) if matches else None,
                    pairs=str(pairs) if pairs else None)
        tmp = sfm_dir / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=1, default=str))
        tmp.replace(sfm_dir / SUMMARY_FILE)
        return write_sfm_report(sfm_dir, summary=info, image_dir=image_dir)
    except Exception as err:  # noqa: BLE001 - any failure: warn, keep the reconstruction
        logger.warning("Could not write the report in %s (the reconstruction is kept): %s: %s",
                       sfm_dir, type(err).__name__, err)
        logger.debug("Report failure", exc_info=True)
        return None
