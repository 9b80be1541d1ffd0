"""Self-contained HTML reports (offline: plotly.js inlined) of reconstructions and benchmarks.

One job per module: ``html`` (the page shell), ``sources`` (what a model, its database and our
h5 files say), ``scene3d`` (points and camera frusta), ``graph`` (the match graph), ``pairs``
(the pair browser), ``reconstruction`` (the reconstruction page), ``bench`` (the HPatches and
pose-benchmark pages). Reports are built from files only and never fail a run.
"""

from .reconstruction import report_after_run, write_sfm_report

__all__ = ["report_after_run", "write_sfm_report"]
