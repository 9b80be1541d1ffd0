import cv2
import numpy as np
from conftest import texture

from dift_sfm.featurizers.sift import SIFT, opencv_octaves
from dift_sfm.keypoints import detect_dog


def test_descriptors_equal_opencv_detect_and_compute():
    """Describing DoG keypoints separately gives OpenCV's own SIFT descriptors (right octave)."""
    img = texture(240, 320, seed=2)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    cv_kpts, cv_desc = cv2.SIFT_create(contrastThreshold=0.04 / 3).detectAndCompute(gray, None)
    packed = np.array([k.octave for k in cv_kpts]) & 0xFFFF  # bits 16+: sub-layer offset
    assert np.array_equal(opencv_octaves(np.array([k.size for k in cv_kpts])), packed)

    kpts = detect_dog(img.astype(np.float32) / 255, max_keypoints=None, multi_orientation=True)
    ours = SIFT({"root": False}).describe(img.astype(np.float32) / 255, kpts.xy,
                                          sizes=kpts.sizes, angles=kpts.angles)
    ref = {(round(k.pt[0], 3), round(k.pt[1], 3), round(k.angle, 2)): d
           for k, d in zip(cv_kpts, cv_desc, strict=True)}
    keys = [(round(x, 3), round(y, 3), round(a, 2))
            for (x, y), a in zip(kpts.xy.tolist(), kpts.angles.tolist(), strict=True)]
    common = [i for i, k in enumerate(keys) if k in ref]
    assert len(common) > 0.9 * len(keys)
    expected = np.stack([ref[keys[i]] for i in common])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    cos = (ours[common] * expected).sum(1)
    assert np.median(cos) > 0.9999 and cos.min() > 0.99


def test_rootsift_is_normalised_and_handles_any_keypoints():
    img = texture(120, 160, seed=4).astype(np.float32) / 255
    kpts = np.array([[10, 10], [80.5, 60.25], [159, 119]], np.float32)
    desc = SIFT().describe(img, kpts)  # no size/angle: default size, upright
    assert desc.shape == (3, 128) and np.all(desc >= 0)
    assert np.allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-5)
    assert SIFT().describe(img, np.zeros((0, 2), np.float32)).shape == (0, 128)
