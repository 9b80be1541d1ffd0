"""Benchmarks: datasets, metrics, cached files, protocol runs (hpatches, pose) and reports.

This file imports nothing heavy, so that the command line can read the names below.
"""

#: The protocols of :func:`dift_sfm.eval.hpatches.run_hpatches`.
PROTOCOLS = ("dift", "gluefactory", "mma")
