"""The synthetic survey of benchmarks/bench_scale.py: its geometry and its pose-error metric.

The benchmark itself reports times; here only what its figures rest on is checked: the
keypoints are the projections of the points (within the noise), the matches of a pair are the
shared points plus the stated outliers, and the similarity alignment recovers a known one.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_umeyama_recovers_a_similarity(bench):
    rng = np.random.default_rng(0)
    src = rng.normal(size=(20, 3))
    r = bench.rotation(0.7, 0.2, -0.1)
    dst = 2.5 * src @ r.T + np.array([1.0, -2.0, 0.5])
    s, r_est, t = bench.umeyama(src, dst)
    assert s == pytest.approx(2.5)
    np.testing.assert_allclose(r_est, r, atol=1e-9)
    np.testing.assert_allclose(t, [1.0, -2.0, 0.5], atol=1e-9)


def test_survey_keypoints_and_matches_follow_the_geometry(bench):
    rng = np.random.default_rng(1)
    scene = bench.make_scene(9, 150.0, rng)
    views = bench.observe(scene, 0.0, rng)  # no noise: keypoints are exact projections
    assert len(views) == 9 and all(len(v["ids"]) > 200 for v in views)
    for c, r, v in zip(scene["centres"], scene["rots"], views, strict=True):
        ids = v["ids"] >= 0
        cam = (scene["points"][v["ids"][ids]] - c) @ r.T
        uv = cam @ bench.K.T
        np.testing.assert_allclose(uv[:, :2] / uv[:, 2:] - 0.5, v["kpts"][ids], atol=1e-3)
        assert 0.1 < (~ids).mean() < 0.2  # distractors
        np.testing.assert_allclose(np.linalg.det(r), 1.0)
    pairs = bench.retrieval_pairs(scene, 4, rng)
    assert all(i < j for i, j in pairs) and len(set(pairs)) == len(pairs)
    i, j = pairs[0]
    m0 = bench.pair_matches(views[i], views[j], False, rng)
    kept = np.flatnonzero(m0 >= 0)
    same = views[i]["ids"][kept] == views[j]["ids"][m0[kept]]
    true = same & (views[i]["ids"][kept] >= 0)
    assert true.sum() > 50
    assert (~true).sum() == pytest.approx(0.15 * true.sum(), abs=2)  # the stated outliers
    assert len(set(m0[kept].tolist())) == len(kept)  # one-to-one
    far = bench.pair_matches(views[i], views[j], True, rng)
    assert (far >= 0).sum() >= min(30, len(views[i]["ids"]))
    assert math.isclose(bench.FOCAL, 768.0)
