"""End-to-end extract -> pairs -> match, through the CLI, on synthetic and real images."""

import logging
import subprocess
import sys

import cv2
import h5py
import numpy as np
import pytest
from conftest import CLI_ENV, interrupt_cli, texture, texture_folder

from dift_sfm.cli import main
from dift_sfm.confs import get_conf
from dift_sfm.errors import FormatError
from dift_sfm.extract import extract_features
from dift_sfm.formats.features import (
    feature_datasets,
    is_complete_features,
    list_names,
    read_keypoints,
)
from dift_sfm.formats.h5store import ShardedH5Writer
from dift_sfm.formats.matches import read_matches


def inlier_ratio(feats, matches, name0, name1, H, thr=3.0):
    k0, k1 = read_keypoints(feats, name0), read_keypoints(feats, name1)
    m, _ = read_matches(matches, name0, name1)
    p = np.c_[k0[m[:, 0]], np.ones(len(m))] @ H.T
    err = np.linalg.norm(p[:, :2] / p[:, 2:] - k1[m[:, 1]], axis=1)
    return len(m), float((err < thr).mean())


def run_all(images, out, *extra, pairs_extra=()):
    assert main(["extract", str(images), "-o", str(out / "f.h5"), *extra]) == 0
    assert main(["pairs", "exhaustive", str(images), "-o", str(out / "p.txt"), *pairs_extra]) == 0
    assert main(["match", str(out / "p.txt"), "--features", str(out / "f.h5"),
                 "-o", str(out / "m.h5")]) == 0


@pytest.mark.parametrize("extra,thr,min_ratio", [
    ([], 3.0, 0.8),
    (["--set", "preprocessing.resize_max=240"], 3.0, 0.8),
    (["--set", "keypoints.name=gftt"], 3.0, 0.7),  # upright, fixed-size SIFT at corners
    (["--conf", "sift-grid"], 16.0, 0.5),  # grid points are not repeatable: within a cell
])
def test_synthetic_warp_end_to_end(synthetic_pair, tmp_path, extra, thr, min_ratio):
    images, H = synthetic_pair
    run_all(images, tmp_path, *extra)
    n, ratio = inlier_ratio(tmp_path / "f.h5", tmp_path / "m.h5", "a.png", "b.png", H, thr)
    assert n > 100 and ratio > min_ratio, (n, ratio)
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["a.png/descriptors"].shape[0] == 128
        assert list(f["b.png/image_size"][()]) == [480, 360]


def test_graffiti_real_photos(shared_data, tmp_path, caplog):
    seq = shared_data / "hpatches" / "v_graffiti"
    (tmp_path / "list.txt").write_text("1.png\n2.png\n")
    image_list = ("--image-list", str(tmp_path / "list.txt"))
    run_all(seq, tmp_path, *image_list, pairs_extra=image_list)
    H = np.loadtxt(seq / "H_1_2")
    n, ratio = inlier_ratio(tmp_path / "f.h5", tmp_path / "m.h5", "1.png", "2.png", H)
    logging.getLogger("dift_sfm").info("v_graffiti 1-2 sift: %d matches, %.1f%% within 3 px",
                                       n, 100 * ratio)
    assert n > 500 and ratio > 0.6, (n, ratio)


def test_import_keypoints_from_another_features_file(synthetic_pair, tmp_path):
    images, _ = synthetic_pair
    # a SuperPoint-like file written by another tool: keypoints + 256-D descriptors
    sp = tmp_path / "superpoint.h5"
    rng = np.random.default_rng(0)
    kp = {n: (rng.random((300, 2)) * [479, 359]).astype(np.float32) for n in ("a.png", "b.png")}
    with h5py.File(sp, "w") as f:
        for n, k in kp.items():
            g = f.create_group(n)
            g["keypoints"], g["descriptors"] = k, rng.random((256, 300)).astype(np.float16)
            g["scores"], g["image_size"] = rng.random(300).astype(np.float32), np.array([480, 360])
    conf = get_conf("sift", {"keypoints.name": "import", "keypoints.path": str(sp),
                             "preprocessing.resize_max": 240})
    out = extract_features(conf, images, tmp_path / "f.h5")
    for n, k in kp.items():
        assert np.allclose(read_keypoints(out, n), k, atol=1e-3)  # original pixels, unchanged
    conf["keypoints"]["max_keypoints"] = 50
    out2 = extract_features(conf, images, tmp_path / "f2.h5")
    assert read_keypoints(out2, "a.png").shape == (50, 2)


def test_resume_skips_done_and_overwrite_recomputes(synthetic_pair, tmp_path, caplog):
    images, _ = synthetic_pair
    conf = get_conf("sift")
    out = extract_features(conf, images, tmp_path / "f.h5", image_list=["a.png"])
    before = read_keypoints(out, "a.png")
    with caplog.at_level(logging.INFO, logger="dift_sfm"):
        extract_features(conf, images, out)
    assert "for 1 images (1 already done)" in caplog.text
    assert list_names(out) == ["a.png", "b.png"]
    assert np.array_equal(read_keypoints(out, "a.png"), before)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dift_sfm"):
        extract_features(conf, images, out, overwrite=True)
    assert "for 2 images (0 already done)" in caplog.text


def test_bad_images_are_named_and_others_written(synthetic_pair, tmp_path, caplog):
    images, _ = synthetic_pair
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    cv2.imwrite(str(images / "tiny.png"), texture(8, 8))
    rc = main(["extract", str(images), "-o", str(tmp_path / "f.h5")])
    assert rc == 1
    assert "broken.jpg" in caplog.text and "tiny.png" in caplog.text
    assert "smaller than" in caplog.text
    assert list_names(tmp_path / "f.h5") == ["a.png", "b.png"]
    caplog.clear()
    (tmp_path / "empty").mkdir()
    assert main(["extract", str(tmp_path / "empty"), "-o", str(tmp_path / "e.h5")]) == 1
    assert "No images found" in caplog.text


def test_bad_pairs_fail_before_matching(synthetic_pair, tmp_path, caplog):
    images, _ = synthetic_pair
    assert main(["extract", str(images), "-o", str(tmp_path / "f.h5")]) == 0
    (tmp_path / "p.txt").write_text("a.png b.png\nb.png\n")
    assert main(["match", str(tmp_path / "p.txt"), "--features", str(tmp_path / "f.h5"),
                 "-o", str(tmp_path / "m.h5")]) == 1
    assert "p.txt:2: expected 'name0 name1'" in caplog.text
    (tmp_path / "p.txt").write_text("a.png b.png\na.png c.png\n")
    assert main(["match", str(tmp_path / "p.txt"), "--features", str(tmp_path / "f.h5"),
                 "-o", str(tmp_path / "m.h5")]) == 1
    assert "p.txt:2: image 'c.png' is not in the features file" in caplog.text
    assert not (tmp_path / "m.h5").exists()


def test_features_of_another_conf_are_refused(synthetic_pair, tmp_path):
    images, _ = synthetic_pair
    out = extract_features(get_conf("sift"), images, tmp_path / "f.h5", image_list=["a.png"])
    with pytest.raises(FormatError, match="written by conf 'sift'"):
        extract_features(get_conf("sift-grid"), images, out)
    extract_features(get_conf("sift-grid"), images, out, overwrite=True)
    assert list_names(out) == ["a.png", "b.png"]
    # a file from another tool (no conf attributes) with 256-D descriptors
    other = tmp_path / "hloc.h5"
    w = ShardedH5Writer(other, is_complete_features)
    w.write("a.png", feature_datasets(np.zeros((2, 2)), np.ones((2, 256)), np.ones(2), (480, 360)))
    w.finalize()
    with pytest.raises(FormatError, match="256-D descriptors"):
        extract_features(get_conf("sift"), images, other)


def test_kill_9_mid_run_then_resume(tmp_path):
    images = texture_folder(tmp_path / "images", 48, 240, 320)
    out = tmp_path / "f.h5"
    args = ["extract", str(images), "-o", str(out), "--set", "keypoints.max_keypoints=512"]
    interrupt_cli(args, tmp_path / "f.h5.parts", delay=0.15).wait()  # mid second shard
    if out.exists():  # whatever is there must open
        list_names(out)
    result = subprocess.run([sys.executable, "-m", "dift_sfm.cli", *args], env=CLI_ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stderr
    assert list_names(out) == [f"{i:02d}.png" for i in range(48)]
    assert not (tmp_path / "f.h5.parts").exists()


def test_pca_reduced_file_resumes_and_matches(synthetic_pair, tmp_path):
    images, H = synthetic_pair
    conf = get_conf("sift", {"pca.dim": 32})
    out = extract_features(conf, images, tmp_path / "f.h5", image_list=["a.png"])
    with h5py.File(out) as f:
        assert f["a.png/descriptors"].shape[0] == 32
    extract_features(conf, images, out)  # adds b.png, projected with the same basis
    with h5py.File(out) as f:
        assert f["b.png/descriptors"].shape[0] == 32
        assert f.attrs["pca_components"].shape == (32, 128)
    assert main(["pairs", "exhaustive", str(images), "-o", str(tmp_path / "p.txt")]) == 0
    assert main(["match", str(tmp_path / "p.txt"), "--features", str(out),
                 "-o", str(tmp_path / "m.h5")]) == 0
    n, ratio = inlier_ratio(out, tmp_path / "m.h5", "a.png", "b.png", H)
    assert n > 100 and ratio > 0.7, (n, ratio)
