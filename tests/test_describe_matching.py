import numpy as np
import pytest
import torch

from dift_sfm.descriptor_sampling import sample_descriptors
from dift_sfm.featurizers.base import DenseFeatures
from dift_sfm.matchers import Matcher, get_matcher, matcher_defaults, mutual_nearest_neighbours


def kornia_mnn(d0: np.ndarray, d1: np.ndarray) -> np.ndarray:
    """Independent oracle: kornia's dense mutual NN on L2-normalised rows, as matches0."""
    from kornia.feature import match_mnn

    t0 = torch.nn.functional.normalize(torch.as_tensor(d0), dim=1)
    t1 = torch.nn.functional.normalize(torch.as_tensor(d1), dim=1)
    _, idx = match_mnn(t0, t1)
    ref = np.full(len(d0), -1, np.int64)
    ref[idx[:, 0].numpy()] = idx[:, 1].numpy()
    return ref


@pytest.mark.parametrize("image_size,map_hw", [((640, 480), (60, 80)), ((500, 301), (19, 32)),
                                               ((768, 768), (384, 384))])
def test_sampling_is_exact_for_linear_maps(image_size, map_hw):
    """A map whose cells hold their own centre (in original pixels) samples back the keypoint."""
    w, h = image_size
    mh, mw = map_hw
    xs = (torch.arange(mw) + 0.5) * w / mw - 0.5
    ys = (torch.arange(mh) + 0.5) * h / mh - 0.5
    fmap = torch.stack([xs[None].expand(mh, mw), ys[:, None].expand(mh, mw),
                        torch.full((mh, mw), 1000.0)])
    rng = np.random.default_rng(0)
    # keypoints between the first and last cell centres (no border clamping there)
    lo = np.array([xs[0], ys[0]]) + 1e-3
    hi = np.array([xs[-1], ys[-1]]) - 1e-3
    kpts = rng.uniform(lo, hi, (200, 2)).astype(np.float32)
    desc = sample_descriptors(fmap, kpts, image_size)
    expected = np.c_[kpts, np.full(len(kpts), 1000.0)]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert desc.shape == (200, 3)
    assert np.abs(desc - expected).max() < 1e-5


def test_dense_features_stride_and_empty():
    dense = DenseFeatures(torch.randn(8, 24, 32), image_size=(1000, 700), input_size=(256, 192))
    assert dense.stride == (8.0, 8.0)
    assert dense.sample(np.zeros((0, 2), np.float32)).shape == (0, 8)
    d = dense.sample(np.array([[10.0, 20.0], [999.0, 699.0]], np.float32))
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)


def test_mnn_matches_dense_reference_and_chunking():
    rng = np.random.default_rng(0)
    d1 = rng.standard_normal((700, 64)).astype(np.float32)
    perm = rng.permutation(700)[:500]
    d0 = d1[perm] + 0.3 * rng.standard_normal((500, 64)).astype(np.float32)
    ref = kornia_mnn(d0, d1)
    for chunk in (7, 128, 100000):
        m0, s0 = mutual_nearest_neighbours(d0, d1, chunk=chunk)
        assert np.array_equal(m0, ref)
    assert (m0[m0 > -1] == perm[m0 > -1]).mean() > 0.95
    assert np.all(s0[m0 == -1] == 0) and np.all(s0[m0 > -1] > 0)


def test_mnn_l2_ratio_threshold_and_edge_cases():
    rng = np.random.default_rng(1)
    d1 = rng.standard_normal((300, 16)).astype(np.float32) * 3
    d0 = d1[:200] + 0.05 * rng.standard_normal((200, 16)).astype(np.float32)
    m0, s0 = mutual_nearest_neighbours(d0, d1, metric="l2")
    assert np.array_equal(m0, np.arange(200))
    dist = np.linalg.norm(d0 - d1[:200], axis=1)
    assert np.allclose(s0, np.exp(-dist), atol=1e-4)
    # a second, nearly identical candidate fails the ratio test
    d1b = np.concatenate([d1, d1[:1] + 1e-3])
    m0r, _ = mutual_nearest_neighbours(d0, d1b, metric="l2", ratio_threshold=0.8)
    assert m0r[0] == -1 and (m0r[1:] > -1).all()
    mt, _ = mutual_nearest_neighbours(d0, d1, metric="l2", min_score=0.1)
    assert np.array_equal(mt > -1, dist <= 0.1)
    m_empty, s_empty = mutual_nearest_neighbours(np.zeros((0, 16)), d1)
    assert m_empty.shape == (0,) and s_empty.shape == (0,)
    m_none, _ = mutual_nearest_neighbours(d0, np.zeros((0, 16)))
    assert (m_none == -1).all()
    with pytest.raises(ValueError):
        mutual_nearest_neighbours(d0, d1[:, :8])


def test_matcher_from_conf_uses_its_defaults_and_settings():
    assert matcher_defaults("mnn")["metric"] == "cosine"
    rng = np.random.default_rng(2)
    d1 = rng.standard_normal((100, 8)).astype(np.float32)
    d0 = d1 + 0.01 * rng.standard_normal((100, 8)).astype(np.float32)
    m_conf, _ = get_matcher({"name": "mnn", "metric": "l2", "min_score": 0.02})(d0, d1)
    m_func, _ = mutual_nearest_neighbours(d0, d1, metric="l2", min_score=0.02)
    assert np.array_equal(m_conf, m_func) and (m_conf == -1).any()


def test_matchers_offer_the_protocol_the_backends_call():
    """Both backends call these without probing: ``matchers.Matcher``."""
    matcher = get_matcher({"name": "mnn", "device": "cpu", "pair_batch": 3, "cache_mb": 2})
    assert isinstance(matcher, Matcher)
    assert matcher.pair_batch == 3 and matcher.device.type == "cpu"
    assert matcher.cache_bytes() == 2 * 2**20
    rng = np.random.default_rng(4)
    d = [rng.standard_normal((n, 8)).astype(np.float32) for n in (30, 40, 50)]
    batched = matcher.match_prepared([matcher.prepare(d[0]), matcher.prepare(d[1])],
                                     [matcher.prepare(d[1]), matcher.prepare(d[2])])
    for (m, s), (a, b) in zip(batched, [(0, 1), (1, 2)], strict=True):
        m1, s1 = matcher(d[a], d[b])
        assert np.array_equal(m, m1) and np.array_equal(s, s1)
