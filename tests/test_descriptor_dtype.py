"""float16 descriptors by default for the DIFT confs (``preprocessing.as_half``), float32
keypoints; an existing output resumes under its own setting; matching reads float32.

Real h5 files written by ``extract``; the DIFT case runs the tiny SD model of
../shared/conformance (skipped when absent), the resume rule runs on ``sift`` (fast).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import texture_folder

from dift_sfm.cli import main as cli_main
from dift_sfm.confs import confs, get_conf
from dift_sfm.extract import extract_features
from dift_sfm.formats.features import FeaturesReader
from dift_sfm.formats.matches import read_matches
from dift_sfm.formats.resume import STORAGE_KEYS, follow_stored
from dift_sfm.match import conf_for_matching, match_features
from dift_sfm.matchers.mnn import mutual_nearest_neighbours
from dift_sfm.pairs import exhaustive_pairs, write_pairs

REPO = Path(__file__).resolve().parents[1]
TINY_SD = Path(os.environ.get("DIFT_SFM_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance")
               ) / "sd" / "model"
SIFT = {"keypoints.max_keypoints": 256}


def _dtypes(path: Path) -> dict[str, set[str]]:
    """dataset name -> the dtypes it has over every image entry of a features file."""
    found: dict[str, set[str]] = {}
    with h5py.File(path, "r") as f:
        for name in f:
            for key, ds in f[name].items():
                found.setdefault(key, set()).add(str(ds.dtype))
    return found


def _stored_half(path: Path) -> bool:
    with FeaturesReader(path) as f:
        return f.conf["preprocessing"]["as_half"]


def test_dift_confs_store_float16_sift_float32():
    for name in ("dift-sd", "dift-sd-semantic", "cleandift-sd", "dift-adm"):
        assert get_conf(name)["preprocessing"]["as_half"] is True, name
    for name in ("sift", "sift-grid"):
        assert get_conf(name)["preprocessing"]["as_half"] is False, name
    assert set(confs) >= {"dift-sd", "dift-sd-semantic", "cleandift-sd", "dift-adm", "sift"}
    assert "as_half" in STORAGE_KEYS


def test_follow_stored_adopts_only_storage_keys(caplog):
    stored = {"preprocessing": {"as_half": False, "resize_max": 1600}, "pca": {"dim": None}}
    wanted = {"preprocessing": {"as_half": True, "resize_max": 800}, "pca": {"dim": None}}
    with caplog.at_level(logging.WARNING, logger="dift_sfm"):
        out = follow_stored(stored, wanted, "f.h5", "features file")
    assert out == {"preprocessing": {"as_half": False, "resize_max": 800}, "pca": {"dim": None}}
    assert wanted["preprocessing"]["as_half"] is True  # not modified in place
    assert "f.h5 stores its entries with preprocessing.as_half=false" in caplog.text
    assert follow_stored(None, wanted, "f.h5") == wanted
    # a file that records no as_half keeps the run's (the resume rule judges it)
    assert follow_stored({"preprocessing": {}}, wanted, "f.h5") == wanted


def test_float32_output_resumes_as_float32(tmp_path, caplog):
    images = texture_folder(tmp_path / "images", 3)
    out = tmp_path / "feats.h5"
    extract_features(get_conf("sift", SIFT), images, out, image_list=["00.png", "01.png"])
    assert _dtypes(out)["descriptors"] == {"float32"}
    # the run asks for float16 (as the DIFT confs do): the file keeps float32, and says so
    half = get_conf("sift", {**SIFT, "preprocessing.as_half": True})
    with caplog.at_level(logging.WARNING, logger="dift_sfm"):
        extract_features(half, images, out)
    assert "stores its entries with preprocessing.as_half=false" in caplog.text
    assert FeaturesReader(out).names == ["00.png", "01.png", "02.png"]
    assert _dtypes(out) == {"keypoints": {"float32"}, "descriptors": {"float32"},
                            "scores": {"float32"}, "image_size": {"int64"}}
    assert _stored_half(out) is False
    # --overwrite applies the run's setting to every entry
    extract_features(half, images, out, overwrite=True)
    assert _dtypes(out)["descriptors"] == {"float16"}
    assert _dtypes(out)["keypoints"] == {"float32"}
    assert _stored_half(out) is True
    # and a float16 file resumed by a float32 run stays float16
    (images / "03.png").write_bytes((images / "00.png").read_bytes())
    extract_features(get_conf("sift", SIFT), images, out)
    assert _dtypes(out)["descriptors"] == {"float16"} and _stored_half(out) is True
    # other settings still follow the one resume rule: refused
    with pytest.raises(Exception, match="other settings.*max_keypoints"):
        extract_features(get_conf("sift", {"keypoints.max_keypoints": 100}), images, out)


def test_float16_matches_are_float32_matching_of_rounded_descriptors(tmp_path):
    images = texture_folder(tmp_path / "images", 3)
    f32, f16 = tmp_path / "f32.h5", tmp_path / "f16.h5"
    extract_features(get_conf("sift", SIFT), images, f32)
    extract_features(get_conf("sift", {**SIFT, "preprocessing.as_half": True}), images, f16)
    names = FeaturesReader(f32).names
    with FeaturesReader(f32) as a, FeaturesReader(f16) as b:
        for n in names:
            np.testing.assert_array_equal(a.keypoints(n), b.keypoints(n))
            d16 = b.descriptors(n)
            assert d16.dtype == np.float32  # read back as float32: the matcher sees float32
            np.testing.assert_array_equal(d16, a.descriptors(n).astype(np.float16)
                                          .astype(np.float32))
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, exhaustive_pairs(names))
    conf = get_conf("sift", SIFT)
    match_features(conf, pairs, f16, tmp_path / "m16.h5")
    mconf = conf["matcher"]
    with FeaturesReader(f16) as b:
        for n0, n1 in exhaustive_pairs(names):
            got, _ = read_matches(tmp_path / "m16.h5", n0, n1)
            m0, _ = mutual_nearest_neighbours(b.descriptors(n0), b.descriptors(n1),
                                              mconf["metric"], mconf["ratio_threshold"],
                                              mconf["min_score"])
            want = np.stack([np.flatnonzero(m0 >= 0), m0[m0 >= 0]], 1)
            np.testing.assert_array_equal(got, want)
    # a named conf that differs from the file only in how it stores descriptors fits it
    with h5py.File(f16, "r+") as f:  # as if written by the conf's own defaults
        stored = json.loads(f.attrs["conf_json"])
        stored["keypoints"]["max_keypoints"] = get_conf("sift")["keypoints"]["max_keypoints"]
        f.attrs["conf_json"] = json.dumps(stored)
    assert conf_for_matching(f16, "sift")["matcher"] == mconf


def test_dift_sd_extract_stores_float16_and_pca_follows(tmp_path):
    if not (TINY_SD / "unet").is_dir():
        pytest.skip(f"tiny SD model absent at {TINY_SD}")
    images = texture_folder(tmp_path / "images", 2, 96, 128)
    common = ["--model", str(TINY_SD), "--max-keypoints", "48", "--device", "cpu",
              "--set", "featurizer.img_size=[128,128]", "--set", "featurizer.ensemble=1"]
    out = tmp_path / "feats.h5"
    assert cli_main(["extract", str(images), "-o", str(out), "--conf", "dift-sd", *common]) == 0
    assert _dtypes(out) == {"keypoints": {"float32"}, "descriptors": {"float16"},
                            "scores": {"float32"}, "image_size": {"int64"}}
    with FeaturesReader(out) as f:
        assert json.loads(f.attrs["conf_json"])["preprocessing"]["as_half"] is True
        d = f.descriptors("00.png")
        assert d.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, atol=2e-3)
    # PCA keeps the file's setting: float16 stays float16, float32 stays float32
    for half, dtype in ((True, "float16"), (False, "float32")):
        red = tmp_path / f"pca-{half}.h5"
        assert cli_main(["extract", str(images), "-o", str(red), "--conf", "dift-sd", *common,
                         "--set", "pca.dim=8",
                         "--set", f"preprocessing.as_half={str(half).lower()}"]) == 0
        assert _dtypes(red)["descriptors"] == {dtype}
        with h5py.File(red) as f:
            assert f["00.png"]["descriptors"].shape[0] == 8
            assert f.attrs["pca_components"].dtype == np.float32
