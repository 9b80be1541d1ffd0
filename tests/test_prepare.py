"""Image preparation (``extract.prepare``): the plan read from the header, reduced JPEG
decoding, detection at a bounded size, the memory budget, and the resume rule over them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import CLI_ENV, texture

from dift_sfm.confs import get_conf
from dift_sfm.errors import ImageReadError
from dift_sfm.extract import extract_features, import_keypoints, plan_preparation, prepare
from dift_sfm.formats.features import FeaturesReader, list_names
from dift_sfm.formats.resume import StaleOutputError
from dift_sfm.geometry import scale_pixel_coords
from dift_sfm.images import read_header, read_image
from dift_sfm.keypoints import Keypoints, detect_keypoints, top_k

LANDED = {"preprocessing.detect_max": None, "preprocessing.reduced_decode": None}


def landed_keypoints(path: Path, conf: dict) -> np.ndarray:
    """Keypoints in original pixels as extract computed them at e232955: full decode, INTER_AREA
    to resize_max, DoG there, mapped back."""
    image = read_image(path)
    h, w = image.shape[:2]
    side = conf["preprocessing"]["resize_max"]
    scale = (1.0, 1.0)
    if side and max(h, w) > side:
        r = side / max(h, w)
        nw, nh = round(w * r), round(h * r)
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        scale = (w / nw, h / nh)
    return scale_pixel_coords(detect_keypoints(image, conf["keypoints"]).xy, scale)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    cv2.imwrite(str(path), cv2.resize(texture(750, 1000, seed=5), (2400, 1800),
                                      interpolation=cv2.INTER_CUBIC))
    return path


def test_sift_conf_keeps_opencv_exact_keypoints(big_jpeg):
    """The sift conf (resize_max 1600, no reduced decode, no detect_max) gives the landed
    keypoints bit for bit."""
    conf = get_conf("sift", {"keypoints.max_keypoints": 1024})
    got = prepare(big_jpeg, conf, "big.jpg")
    assert got.image_size == (2400, 1800) and got.resized.shape == (1200, 1600, 3)
    assert np.array_equal(got.keypoints.xy, landed_keypoints(big_jpeg, conf))


def test_dift_conf_on_a_small_image_is_unchanged(tmp_path):
    """Below detect_max and the featurizer's need, the DIFT confs prepare as they did."""
    path = tmp_path / "s.jpg"
    cv2.imwrite(str(path), texture(600, 800, seed=2))
    conf = get_conf("dift-sd", {"keypoints.max_keypoints": 512})
    plan = plan_preparation(read_header(path.read_bytes()), conf)
    assert plan.reduce == 1 and plan.detected == (800, 600)
    got = prepare(path, conf, "s.jpg")
    landed = get_conf("dift-sd", {**LANDED, "keypoints.max_keypoints": 512})
    assert np.array_equal(got.keypoints.xy, landed_keypoints(path, landed))


def _blob_image(w: int, h: int, centres: np.ndarray, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w), 40, np.float32)
    for x, y in centres:
        img += 200 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_dift_conf_on_a_12mp_jpeg_maps_keypoints_to_original_pixels(tmp_path):
    """4032x3024 JPEG of 48 blobs: decoded at 1/2, detected at 1600x1200; every blob centre
    has a keypoint in ORIGINAL pixels, and the featurizer's frame is the decoded one.

    (OpenCV's DoG puts its points +(2^o - 1) / 2 px off for octave o, +0.25 px for the
    doubled octave -1: ~0.3 px at full resolution here, x2.52 at 1600 px; hence 1.2 px.)"""
    centres = np.stack(np.meshgrid(np.arange(300, 3832, 450.3), np.arange(300, 2824, 450.7)),
                       -1).reshape(-1, 2)
    path = tmp_path / "p.jpg"
    cv2.imwrite(str(path), _blob_image(4032, 3024, centres, 20.0), [cv2.IMWRITE_JPEG_QUALITY, 98])
    conf = get_conf("dift-sd", {"keypoints.max_keypoints": 200})
    plan = plan_preparation(read_header(path.read_bytes()), conf)
    assert (plan.reduce, plan.decoded, plan.detected) == (2, (2016, 1512), (1600, 1200))
    got = prepare(path, conf, "p.jpg")
    assert got.image_size == (4032, 3024) and got.resized.shape == (1512, 2016, 3)
    xy = got.keypoints.xy
    dist = np.linalg.norm(centres[:, None] - xy[None], axis=2).min(1)
    assert len(centres) == 48 and dist.max() < 1.2
    assert np.allclose(got.keypoints_resized.xy, scale_pixel_coords(xy, (0.5, 0.5)), atol=1e-3)


def test_an_image_over_the_memory_budget_is_refused_before_decoding(tmp_path):
    """The header says 12000x9000; the pixels are garbage. The refusal names the image and
    the budget: it came from the header, as decoding would have failed otherwise."""
    ok, buf = cv2.imencode(".jpg", texture(40, 60))
    data = bytearray(buf.tobytes())
    header = read_header(bytes(data))
    assert header.size == (60, 40)
    sof = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] == 0xC0)

    def fake(w: int, h: int) -> Path:
        data[sof + 5:sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
        path = tmp_path / f"huge{w}.jpg"
        path.write_bytes(bytes(data[:sof + 40]))
        return path

    path = fake(12000, 9000)
    with pytest.raises(ImageReadError) as err:
        prepare(path, get_conf("sift", {"preprocessing.memory_mb": 1000}), "huge.jpg")
    msg = str(err.value)
    assert str(path) in msg and "12000x9000" in msg and "memory_mb=1000" in msg
    assert "\n" not in msg
    # within budget, the same file fails in the decoder instead
    with pytest.raises(ImageReadError, match="Could not decode"):
        prepare(path, get_conf("sift", {"preprocessing.memory_mb": None}), "huge.jpg")
    # over the pixel limit whatever the budget, also before decoding
    with pytest.raises(ImageReadError, match="too large .30000x20000, 600 MP"):
        prepare(fake(30000, 20000), get_conf("sift", {"preprocessing.memory_mb": None}), "h")


def test_the_budget_holds_big_jpegs_with_dift_confs(tmp_path):
    """A 108 MP JPEG: the DIFT conf's plan fits the default budget (decoded at 1/4, detected
    at 1600 px); with the landed settings (full-size DoG) it is refused up front."""
    path = tmp_path / "h.jpg"
    cv2.imwrite(str(path), np.zeros((16, 16, 3), np.uint8))
    data = bytearray(path.read_bytes())
    sof = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] == 0xC0)
    data[sof + 5:sof + 9] = (9000).to_bytes(2, "big") + (12000).to_bytes(2, "big")
    header = read_header(bytes(data))
    plan = plan_preparation(header, get_conf("dift-sd"))
    assert plan.reduce == 4 and plan.detected == (1600, 1200)
    assert plan.peak_bytes < 1024 * 2**20
    landed = plan_preparation(header, get_conf("dift-sd", LANDED))
    assert landed.peak_bytes > 4096 * 2**20
    sift = plan_preparation(header, get_conf("sift"))
    assert sift.reduce == 1 and sift.peak_bytes < 4096 * 2**20


def test_cli_refuses_only_the_big_image_with_one_line(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.png"), texture(120, 160, seed=i))
    cv2.imwrite(str(folder / "big.jpg"), cv2.resize(texture(300, 400), (2400, 1800)))
    out = tmp_path / "f.h5"
    proc = subprocess.run([sys.executable, "-m", "dift_sfm.cli", "-q", "extract", str(folder),
                           "-o", str(out), "--conf", "sift", "--set",
                           "preprocessing.memory_mb=200"], env=CLI_ENV, capture_output=True,
                          text=True)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if "big.jpg" in ln]
    assert lines and all("preprocessing.memory_mb=200" in ln for ln in lines)
    assert "Traceback" not in proc.stderr
    assert sorted(list_names(out)) == ["0.png", "1.png"]


def _drop_keys(path: Path, keys: tuple[str, ...]) -> None:
    """Make ``path`` look written before ``keys`` existed (their absence in conf_json)."""
    with h5py.File(path, "r+") as f:
        conf = json.loads(f.attrs["conf_json"])
        for k in keys:
            conf["preprocessing"].pop(k)
        f.attrs["conf_json"] = json.dumps(conf)


def test_detection_settings_are_part_of_the_stored_conf(tmp_path):
    """detect_max and reduced_decode are stored; resuming with others is refused as the
    resume rule does; memory_mb is a runtime key; a file written before the keys existed
    resumes with the landed behaviour only."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.jpg"), texture(200, 300, seed=i))
    out = tmp_path / "f.h5"
    conf = get_conf("sift", {"keypoints.max_keypoints": 256})
    extract_features(conf, folder, out, image_list=["0.jpg"])
    with FeaturesReader(out) as f:
        assert f.conf["preprocessing"]["detect_max"] is None
    bounded = get_conf("sift", {"keypoints.max_keypoints": 256, "preprocessing.detect_max": 160})
    with pytest.raises(StaleOutputError, match="preprocessing.detect_max"):
        extract_features(bounded, folder, out)
    reduced = get_conf("sift", {"keypoints.max_keypoints": 256,
                                "preprocessing.reduced_decode": True})
    with pytest.raises(StaleOutputError, match="preprocessing.reduced_decode"):
        extract_features(reduced, folder, out)
    runtime = get_conf("sift", {"keypoints.max_keypoints": 256, "preprocessing.memory_mb": 999})
    extract_features(runtime, folder, out)  # resumes: memory_mb changes no entry
    assert sorted(list_names(out)) == ["0.jpg", "1.jpg"]
    _drop_keys(out, ("detect_max", "reduced_decode", "memory_mb"))
    extract_features(conf, folder, out)  # an older file: the landed behaviour resumes
    with pytest.raises(StaleOutputError, match="detect_max: null -> 1600"):
        extract_features(get_conf("sift", {"keypoints.max_keypoints": 256,
                                           "preprocessing.detect_max": 1600}), folder, out)


def test_import_keypoints_reads_through_the_step(tmp_path):
    """The import detector lives with the step (it reads a features file); its top-k is the
    detectors' top_k."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), texture(200, 300, seed=1))
    src = tmp_path / "src.h5"
    extract_features(get_conf("sift", {"keypoints.max_keypoints": 300}), folder, src)
    with FeaturesReader(src) as f:
        xy, scores = f.keypoints("a.jpg"), f.scores("a.jpg")
    got = import_keypoints("a.jpg", src, max_keypoints=50)
    want = top_k(Keypoints(xy, scores), 50)
    assert np.array_equal(got.xy, want.xy) and len(got) == 50
    assert np.array_equal(import_keypoints("a.jpg", src).xy, xy)


def test_matches_of_features_before_bounded_detection_are_refused(tmp_path):
    """Features re-extracted with detect_max (another file, or --overwrite) no longer match
    the matches computed from the older features: `match` refuses to extend them."""
    from dift_sfm.match import conf_for_matching, match_features
    from dift_sfm.pairs import exhaustive_pairs, write_pairs

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.jpg"), texture(240, 320, seed=i))
    old = extract_features(get_conf("sift", {"keypoints.max_keypoints": 200}), folder,
                           tmp_path / "f.h5")
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, exhaustive_pairs(list_names(old)))
    m = match_features(conf_for_matching(old), pairs, old, tmp_path / "m.h5")
    new = extract_features(get_conf("sift", {"keypoints.max_keypoints": 200,
                                             "preprocessing.detect_max": 160}),
                           folder, tmp_path / "f.h5", overwrite=True)
    with FeaturesReader(new) as f:
        assert f.conf["preprocessing"]["detect_max"] == 160
    with pytest.raises(StaleOutputError, match="computed from other features"):
        match_features(conf_for_matching(new), pairs, new, m)
