import numpy as np
import pytest
from conftest import texture

from dift_sfm.cli import build_parser, main
from dift_sfm.errors import DiftSfmError
from dift_sfm.keypoints import detect_dog, detect_gftt, detect_grid, detect_keypoints


@pytest.fixture(scope="module")
def image():
    return texture(240, 320, seed=5).astype(np.float32) / 255.0


@pytest.mark.parametrize("name", ["dog", "gftt", "harris"])
def test_detectors_limit_and_order(image, name):
    kpts = detect_keypoints(image, {"name": name, "max_keypoints": 100})
    assert 50 <= len(kpts) <= 100
    assert kpts.xy.dtype == np.float32 and kpts.xy.shape == (len(kpts), 2)
    assert np.all(np.diff(kpts.scores) <= 1e-6)  # strongest first
    assert np.all((kpts.xy >= 0) & (kpts.xy <= [319, 239]))


def test_dog_keeps_one_point_per_location(image):
    kpts = detect_dog(image, max_keypoints=None)
    assert len(np.unique(np.round(kpts.xy * 8), axis=0)) == len(kpts)
    assert kpts.sizes is not None and kpts.angles is not None


def test_gftt_on_flat_image_is_empty():
    assert len(detect_gftt(np.full((64, 64, 3), 0.5, np.float32))) == 0
    assert len(detect_dog(np.full((64, 64, 3), 0.5, np.float32))) == 0


def test_grid_is_centred_and_limited():
    kpts = detect_grid(np.zeros((100, 160, 3)), step=16)
    assert len(kpts) == 6 * 10
    assert np.allclose(kpts.xy.mean(0), [79.5, 49.5])
    assert len(detect_grid(np.zeros((100, 160, 3)), step=4, max_keypoints=100)) <= 100


def test_unknown_detector():
    with pytest.raises(DiftSfmError, match="Unknown keypoint detector"):
        detect_keypoints(np.zeros((32, 32, 3)), {"name": "superpoint"})


def test_cli_confs_and_help(capsys):
    assert main(["confs"]) == 0
    out = capsys.readouterr().out
    for name in ("sift", "dift-sd", "dift-adm"):
        assert name in out
    assert main(["confs", "dift-adm"]) == 0
    assert '"output_block": 11' in capsys.readouterr().out
    for cmd in ("extract", "pairs", "match"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([cmd, "--help"])
        assert exit_info.value.code == 0
    assert main(["extract", "/nonexistent", "-o", "/tmp/x.h5", "--set", "novalue"]) == 1
