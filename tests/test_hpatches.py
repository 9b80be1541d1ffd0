"""HPatches / Oxford readers, the homography benchmark (checked by hand), the pose benchmark."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA, SHARED, texture, warp

from dift_sfm.cli import main
from dift_sfm.confs import get_conf
from dift_sfm.eval.datasets import (
    DatasetError,
    common_base,
    find_sequences,
    homography_pairs,
    read_homography,
    read_pose_pairs,
)
from dift_sfm.eval.hpatches import run_hpatches
from dift_sfm.eval.pose import run_pose_benchmark
from dift_sfm.formats.features import read_image_size, read_keypoints
from dift_sfm.formats.matches import read_matches

ACC = (1, 3, 5)


# --------------------------------------------------------------------------- helpers
def _write_H(path: Path, H: np.ndarray) -> None:
    path.write_text("\n".join(" ".join(f"{v:.10g}" for v in row) for row in H) + "\n")


def _viewpoint_H(k: int, w: int, h: int) -> np.ndarray:
    """A homography growing with k: rotation, scale and perspective about the centre."""
    c = np.array([[1, 0, w / 2], [0, 1, h / 2], [0, 0, 1.0]])
    a = np.radians(4.0 * (k - 1))
    s = 1 - 0.04 * (k - 1)
    A = np.array([[s * np.cos(a), -s * np.sin(a), 3.0 * k],
                  [s * np.sin(a), s * np.cos(a), -2.0 * k],
                  [1.5e-4 * (k - 1), -1e-4 * (k - 1), 1]])
    return c @ A @ np.linalg.inv(c)


def _make_layout(root: Path, name: str, n_images: int = 2, w: int = 48, h: int = 40,
                 layout: str = "hpatches", ext: str = ".png", gts=None) -> Path:
    seq = root / name
    seq.mkdir(parents=True)
    img = texture(h, w, seed=len(name))
    for i in range(1, n_images + 1):
        stem = str(i) if layout == "hpatches" else f"img{i}"
        cv2.imwrite(str(seq / f"{stem}{ext}"), img)
    for k in (gts if gts is not None else range(2, n_images + 1)):
        _write_H(seq / (f"H_1_{k}" if layout == "hpatches" else f"H1to{k}p"), np.eye(3))
    return seq


# --------------------------------------------------------------------------- readers
def test_readers_layouts_subset_and_missing_gt(tmp_path):
    root = tmp_path / "hpatches-sequences-release"
    for name in ("i_ajuntament", "v_bird", "i_dc", "v_talent"):
        _make_layout(root, name, 6, ext=".ppm")
    _make_layout(root, "v_partial", 3, gts=[2])  # 3 images, only H_1_2
    (root / "notes").mkdir()  # not a sequence: ignored
    (root / "README.txt").write_text("hi")
    seqs = find_sequences(root)
    assert [s.name for s in seqs] == ["i_ajuntament", "i_dc", "v_bird", "v_partial", "v_talent"]
    assert {s.name: s.category for s in seqs}["i_dc"] == "illumination"
    assert {s.name: s.category for s in seqs}["v_bird"] == "viewpoint"
    sub = find_sequences(root, subset="108")
    assert [s.name for s in sub] == ["i_ajuntament", "v_bird", "v_partial"]
    pairs = homography_pairs(sub, common_base(sub))
    assert [(p.sequence, p.k) for p in pairs] == (
        [("i_ajuntament", k) for k in range(2, 7)] + [("v_bird", k) for k in range(2, 7)]
        + [("v_partial", 2)])
    assert pairs[0].name0 == "i_ajuntament/1.ppm" and pairs[0].name1 == "i_ajuntament/2.ppm"
    # a single sequence folder as the root
    one = find_sequences(root / "v_partial")
    assert [s.name for s in one] == ["v_partial"]
    assert homography_pairs(one, common_base(one))[0].name1 == "v_partial/2.png"
    with pytest.raises(DatasetError, match="Unknown subset"):
        find_sequences(root, subset="100")


def test_readers_oxford_layout_and_categories(tmp_path):
    root = tmp_path / "oxford"
    _make_layout(root, "bark", 6, layout="oxford")
    _make_layout(root, "leuven", 4, layout="oxford", ext=".jpg", gts=[2, 3, 4])
    seqs = find_sequences(root)
    assert [(s.name, s.layout, s.category) for s in seqs] == [
        ("bark", "oxford", "viewpoint"), ("leuven", "oxford", "illumination")]
    pairs = homography_pairs(seqs, common_base(seqs))
    assert len(pairs) == 5 + 3
    assert pairs[0].name0 == "bark/img1.png" and pairs[-1].name1 == "leuven/img4.jpg"
    # mixed roots: names relative to the common ancestor; duplicate names refused
    hp = tmp_path / "hp"
    _make_layout(hp, "v_x", 2)
    both = find_sequences([root, hp])
    names = [p.name0 for p in homography_pairs(both, common_base(both))]
    assert "oxford/bark/img1.png" in names and "hp/v_x/1.png" in names
    _make_layout(tmp_path / "other", "bark", 2, layout="oxford")
    with pytest.raises(DatasetError, match="appears twice"):
        find_sequences([root, tmp_path / "other"])


def test_readers_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        find_sequences(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No HPatches"):
        find_sequences(tmp_path / "empty")
    bad = tmp_path / "H_1_2"
    bad.write_text("1 0 0\n0 1 0\n")
    with pytest.raises(DatasetError, match=r"H_1_2 has 6 numbers"):
        read_homography(bad)
    bad.write_text("1 0 0 0 1 0 0 0 x")
    with pytest.raises(DatasetError, match="H_1_2 is malformed"):
        read_homography(bad)
    bad.write_text("0 0 0 0 0 0 0 0 1")
    with pytest.raises(DatasetError, match="singular"):
        read_homography(bad)
    with pytest.raises(DatasetError, match="does not exist"):
        read_homography(tmp_path / "H_1_3")
    # a malformed GT inside a sequence is reported when pairs are built
    seq = _make_layout(tmp_path / "root", "v_bad", 2)
    (seq / "H_1_2").write_text("garbage")
    with pytest.raises(DatasetError, match="v_bad/H_1_2"):
        homography_pairs(find_sequences(seq), seq.parent)


def _pose_line(n0, n1, K0, K1, T, rot=(0, 0)) -> str:
    vals = [*rot, *K0.ravel(), *K1.ravel(), *T.ravel()]
    return f"{n0} {n1} " + " ".join(f"{v:.10g}" for v in vals)


def test_pose_reader(tmp_path):
    K = np.array([[500.0, 0, 320], [0, 505, 240], [0, 0, 1]])
    T = np.eye(4)
    T[:3, :3] = _rot_y(10)
    T[:3, 3] = [0.5, 0, 0.1]
    path = tmp_path / "pairs_with_gt.txt"
    path.write_text("# comment\n" + _pose_line("a.jpg", "b.jpg", K, 2 * K, T, (0, 1)) + "\n\n")
    (p,) = read_pose_pairs(path)
    assert (p.name0, p.name1, p.rot0, p.rot1) == ("a.jpg", "b.jpg", 0, 1)
    np.testing.assert_allclose(p.K0, K)
    np.testing.assert_allclose(p.K1, K)  # normalised so K[2, 2] = 1
    np.testing.assert_allclose(p.R, T[:3, :3])
    np.testing.assert_allclose(p.t, [0.5, 0, 0.1])
    path.write_text("a b 0 0 1 2 3\n")
    with pytest.raises(DatasetError, match=r"pairs_with_gt.txt:1: expected 38 columns"):
        read_pose_pairs(path)
    T_bad = T.copy()
    T_bad[:3, :3] *= 2
    path.write_text("\n" + _pose_line("a", "b", K, K, T_bad))
    with pytest.raises(DatasetError, match=r":2: T_0to1 is not a rigid"):
        read_pose_pairs(path)
    if (DATA / "scannet_sample" / "pairs_with_gt.txt").is_file():
        pairs = read_pose_pairs(DATA / "scannet_sample" / "pairs_with_gt.txt")
        assert len(pairs) == 15 and all(p.rot0 == p.rot1 == 0 for p in pairs)
        assert pairs[0].K0[0, 0] == pytest.approx(1163.45)


# --------------------------------------------------------------------------- synthetic benchmark
@pytest.fixture(scope="module")
def synthetic_hpatches(tmp_path_factory):
    """An HPatches-layout folder: v_synth (6 images, viewpoint) and i_synth (3 images,
    photometric changes, identity H), from a generated texture."""
    root = tmp_path_factory.mktemp("hp") / "release"
    w, h = 320, 240
    img = texture(h, w, seed=11)
    v = root / "v_synth"
    v.mkdir(parents=True)
    cv2.imwrite(str(v / "1.ppm"), img)
    for k in range(2, 7):
        H = _viewpoint_H(k, w, h)
        cv2.imwrite(str(v / f"{k}.ppm"), warp(img, H))
        _write_H(v / f"H_1_{k}", H)
    i = root / "i_synth"
    i.mkdir()
    img2 = texture(h, w, seed=12)
    cv2.imwrite(str(i / "1.png"), img2)
    for k, (gain, gamma) in ((2, (0.7, 1.0)), (3, (1.0, 1.6))):
        out = np.clip(255 * gain * (img2 / 255.0) ** gamma, 0, 255).astype(np.uint8)
        cv2.imwrite(str(i / f"{k}.png"), out)
        _write_H(i / f"H_1_{k}", np.eye(3))
    out = root.parent / "out"
    results = run_hpatches(get_conf("sift"), root, out, max_keypoints=500, num_viz=1)
    return root, out, results


def test_synthetic_benchmark_by_hand(synthetic_hpatches):
    root, out, results = synthetic_hpatches
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    pairs = saved["pairs"]
    assert [(p["sequence"], p["k"]) for p in pairs] == (
        [("i_synth", 2), ("i_synth", 3)] + [("v_synth", k) for k in range(2, 7)])
    feats, matches = Path(saved["files"]["features_full"]), Path(saved["files"]["matches_full"])
    s = saved["summary"]
    correct = {"illumination": [], "viewpoint": []}
    mma = {"illumination": [], "viewpoint": []}
    for p in pairs:
        kp0, kp1 = read_keypoints(feats, p["name0"]), read_keypoints(feats, p["name1"])
        m, _ = read_matches(matches, p["name0"], p["name1"])
        assert len(kp0) <= 500 and p["num_keypoints0"] == len(kp0)
        assert p["num_matches"] == len(m) > 0
        H_gt = np.loadtxt(root / p["sequence"] / f"H_1_{p['k']}")
        # DIFT protocol: OpenCV RANSAC 3 px on the matched keypoints, seed 0
        x0, x1 = kp0[m[:, 0]].astype(np.float64), kp1[m[:, 1]].astype(np.float64)
        cv2.setRNGSeed(0)
        H_cv, _ = cv2.findHomography(x0, x1, cv2.RANSAC, 3.0, maxIters=10000, confidence=0.9999)
        np.testing.assert_allclose(np.array(p["dift"]["H"]), H_cv / H_cv[2, 2], rtol=1e-9)
        w, h = cv2.imread(str(root / p["name0"])).shape[1::-1]
        corners = np.array([[0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], float)
        a, b = corners @ H_cv.T, corners @ H_gt.T
        err = np.mean(np.linalg.norm(a[:, :2] / a[:, 2:] - b[:, :2] / b[:, 2:], axis=1))
        assert p["dift"]["corner_error"] == pytest.approx(err, rel=1e-9)
        assert p["dift"]["correct"] == [bool(err <= t) for t in ACC]
        correct[p["category"]].append([err <= t for t in ACC])
        # D2-Net MMA
        y = np.c_[x0, np.ones(len(x0))] @ H_gt.T
        d = np.linalg.norm(y[:, :2] / y[:, 2:] - x1, axis=1)
        by_hand = [np.mean(d <= t) for t in range(1, 11)]
        np.testing.assert_allclose(p["mma"], by_hand)
        mma[p["category"]].append(by_hand)
    for c in ("illumination", "viewpoint"):
        np.testing.assert_allclose(s["dift"]["accuracy"][c], np.mean(correct[c], 0))
        np.testing.assert_allclose(s["mma"]["mma"][c], np.mean(mma[c], 0))
    np.testing.assert_allclose(s["dift"]["accuracy"]["all"],
                               np.mean(correct["illumination"] + correct["viewpoint"], 0))
    np.testing.assert_allclose(s["mma"]["mma"]["all"],
                               np.mean(mma["illumination"] + mma["viewpoint"], 0))
    assert s["mma"]["mean_num_matches"]["all"] == pytest.approx(
        np.mean([p["num_matches"] for p in pairs]))
    names = {n for p in pairs for n in (p["name0"], p["name1"])}
    assert s["mma"]["mean_num_keypoints"]["all"] == pytest.approx(
        np.mean([len(read_keypoints(feats, n)) for n in names]))
    # SIFT solves the easy synthetic pairs: every illumination pair and viewpoint 1-2.
    assert all(p["dift"]["corner_error"] < 1.0 for p in pairs if p["k"] == 2)
    assert s["dift"]["accuracy"]["illumination"] == [1.0, 1.0, 1.0]


def test_synthetic_gluefactory_by_hand(synthetic_hpatches):
    root, out, results = synthetic_hpatches
    pairs, s = results["pairs"], results["summary"]["gluefactory"]
    feats = Path(results["files"]["features_short"])
    matches = Path(results["files"]["matches_short"])
    assert s["short_side"] == 480 and s["estimator"] == "pycolmap" and s["threshold_px"] == 1.0
    errors = {"illumination": [], "viewpoint": []}
    for p in pairs:
        n0 = str(Path(p["name0"]).with_suffix(".png"))
        n1 = str(Path(p["name1"]).with_suffix(".png"))
        W, H = cv2.imread(str(root / p["name0"])).shape[1::-1]
        w, h = read_image_size(feats, n0)
        assert min(w, h) == 480 and w == round(W * 480 / H)
        m, _ = read_matches(matches, n0, n1)
        assert p["gluefactory"]["num_matches"] == len(m)
        assert p["gluefactory"]["num_keypoints0"] == len(read_keypoints(feats, n0))
        # true H in the resized frame: resized -> original, H, original -> resized
        H_gt = np.loadtxt(root / p["sequence"] / f"H_1_{p['k']}")
        sx, sy = w / W, h / H
        to_orig = np.array([[1 / sx, 0, 0.5 / sx - 0.5], [0, 1 / sy, 0.5 / sy - 0.5], [0, 0, 1]])
        H_r = np.linalg.inv(to_orig) @ H_gt @ to_orig
        np.testing.assert_allclose(np.array(p["gluefactory"]["H_gt"]), H_r / H_r[2, 2],
                                   atol=1e-9)
        err = p["gluefactory"]["corner_error"]
        errors[p["category"]].append(np.inf if err is None else err)
    # SIFT solves the easy synthetic pairs at the short side too (as at full resolution)
    assert all(p["gluefactory"]["corner_error"] is not None
               and p["gluefactory"]["corner_error"] < 1.0 for p in pairs if p["k"] == 2)
    for c in ("illumination", "viewpoint", "all"):
        errs = np.sort(errors["illumination"] + errors["viewpoint"] if c == "all" else errors[c])
        for t, auc in zip(ACC, s["auc"][c], strict=True):
            # recall curve: linear between sorted errors <= t, flat after; integrate densely
            below = errs[errs <= t]
            xs = np.linspace(0, t, 100001)
            r = np.interp(xs, np.r_[0, below], np.r_[0, np.arange(1, len(below) + 1)] / len(errs))
            assert auc == pytest.approx(np.trapezoid(r, xs) / t, abs=1e-6)
    assert all(p["gluefactory"]["corner_error"] < 1.0 for p in pairs if p["k"] == 2)


def test_synthetic_outputs_and_resume(synthetic_hpatches):
    root, out, results = synthetic_hpatches
    for name in ("results.md", "mma.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.glob("matches_*.png"))) == 1
    md = (out / "results.md").read_text()
    assert "| dift (ransac 3.0 px) |" in md and "MMA" in md and "AUC" in md
    feats = Path(results["files"]["features_full"])
    stamp = feats.stat().st_mtime_ns
    again = run_hpatches(get_conf("sift"), root, out, max_keypoints=500, num_viz=0)
    assert feats.stat().st_mtime_ns == stamp  # nothing re-extracted
    assert again["summary"] == results["summary"]


def test_keypoints_from_file(synthetic_hpatches, tmp_path):
    """Imported keypoints: described as given at full resolution, rescaled at short side 480."""
    root, out, results = synthetic_hpatches
    user = Path(results["files"]["features_full"])  # plays a user's hloc features file
    res = run_hpatches(get_conf("sift"), root / "v_synth", tmp_path / "imp",
                       protocols=["dift", "gluefactory"], keypoints_from=user, num_viz=0)
    full, short = Path(res["files"]["features_full"]), Path(res["files"]["features_short"])
    for name in ("v_synth/1.ppm", "v_synth/4.ppm"):
        xy = read_keypoints(user, name)
        np.testing.assert_allclose(read_keypoints(full, name), xy)
        W, H = read_image_size(user, name)
        w, h = read_image_size(short, name.replace(".ppm", ".png"))
        np.testing.assert_allclose(read_keypoints(short, name.replace(".ppm", ".png")),
                                   (xy + 0.5) * [w / W, h / H] - 0.5, atol=1e-4)
    assert res["summary"]["dift"]["accuracy"]["viewpoint"][2] > 0


def test_cli_hpatches_and_errors(synthetic_hpatches, tmp_path):
    root, _, _ = synthetic_hpatches
    out = tmp_path / "cli"
    rc = main(["-q", "hpatches", str(root / "i_synth"), "--conf", "sift", "-o", str(out),
               "--protocol", "dift", "--protocol", "mma", "--estimator", "magsac",
               "--threshold", "2", "--max-keypoints", "300", "--num-viz", "0"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocols"] == ["dift", "mma"] and "gluefactory" not in res["summary"]
    assert res["summary"]["dift"]["estimator"] == "magsac"
    assert res["summary"]["dift"]["threshold_px"] == 2.0
    assert all(p["num_keypoints0"] <= 300 for p in res["pairs"])
    assert main(["-q", "hpatches", str(tmp_path / "missing"), "-o", str(out)]) == 1
    assert main(["-q", "hpatches", str(root), "-o", str(out), "--gf-threshold", "x"]) == 1


# --------------------------------------------------------------------------- pose benchmark
def _rot_y(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def _render(K, R, t, size, textures) -> np.ndarray:
    """Ray-cast a room corner (floor y=1.2, back wall z=7, left wall x=-2.5), each plane
    textured, seen by a camera with x_cam = R x_world + t (pixel centres at integers)."""
    w, h = size
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T @ R  # world directions
    centre = -R.T @ t
    planes = [(1, 1.2, (0, 2)), (2, 7.0, (0, 1)), (0, -2.5, (2, 1))]  # axis, offset, uv axes
    depth = np.full((h, w), np.inf)
    image = np.zeros((h, w, 3), np.uint8)
    for (axis, offset, (a, b)), tex in zip(planes, textures, strict=True):
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = (offset - centre[axis]) / rays[..., axis]
        pts = centre + lam[..., None] * rays
        ok = (lam > 0) & (lam < depth)
        px = (pts[..., a] + 4) * 60  # 60 texture pixels per metre
        py = (pts[..., b] + 4) * 60
        sample = cv2.remap(tex, px.astype(np.float32), py.astype(np.float32), cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT)
        image[ok] = sample[ok]
        depth[ok] = lam[ok]
    return image


def test_pose_benchmark_rendered_scene(tmp_path):
    size = (480, 360)
    K = np.array([[380.0, 0, 239.5], [0, 380.0, 179.5], [0, 0, 1]])
    textures = [texture(720, 720, seed=s) for s in (21, 22, 23)]
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "view0.png"), _render(K, np.eye(3), np.zeros(3), size, textures))
    lines = []
    for i, (deg, t) in enumerate([(8.0, [-0.4, 0.05, 0.1]), (-6.0, [0.3, -0.05, -0.3])], 1):
        R = _rot_y(deg)
        cv2.imwrite(str(images / f"view{i}.png"), _render(K, R, np.array(t), size, textures))
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, t
        lines.append(_pose_line("view0.png", f"view{i}.png", K, K, T))
    pairs = tmp_path / "pairs_with_gt.txt"
    pairs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pose"
    assert main(["-q", "pose-bench", str(pairs), "--images", str(images), "--conf", "sift",
                 "-o", str(out), "--max-keypoints", "1500"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [p["name1"] for p in res["pairs"]] == ["view1.png", "view2.png"]
    for p in res["pairs"]:
        assert p["success"] and p["error_R"] < 1.0 and p["error_t"] < 3.0, p
        assert p["precision"] > 0.5
    e1, e2 = sorted(max(p["error_R"], p["error_t"]) for p in res["pairs"])
    for thr, auc in zip((5, 10, 20), res["summary"]["auc"], strict=True):
        # recall curve (0, 0) -> (e1, 1/2) -> (e2, 1) -> (thr, 1): area thr - e1/2 - e2/4
        assert auc == pytest.approx((thr - e1 / 2 - e2 / 4) / thr, abs=1e-9)
    # python API gives the same, from the cache
    again = run_pose_benchmark(get_conf("sift", {"keypoints.max_keypoints": 1500}), pairs,
                               images, out)
    assert again["summary"] == res["summary"]


# --------------------------------------------------------------------------- shared data
@pytest.fixture(scope="module")
def shared_results(tmp_path_factory):
    roots = [DATA / "hpatches" / "v_graffiti", DATA / "hpatches" / "v_boat",
             DATA / "oxford_affine" / "bark", DATA / "oxford_affine" / "boat"]
    if not all(r.is_dir() for r in roots):
        pytest.skip(f"shared data not found under {DATA} (HPatches/Oxford tests need it)")
    return run_hpatches(get_conf("sift"), roots, tmp_path_factory.mktemp("shared"), num_viz=1)


@pytest.mark.shared
@pytest.mark.slow
def test_shared_sift_all_protocols(shared_results):
    res = shared_results
    pairs = {(p["sequence"], p["k"]): p for p in res["pairs"]}
    assert len(pairs) == 5 + 1 + 5 + 5  # v_boat has only H_1_2
    for key in (("v_graffiti", 2), ("v_boat", 2), ("boat", 2)):
        assert pairs[key]["dift"]["corner_error"] <= 3.0, key
        assert pairs[key]["gluefactory"]["corner_error"] <= 3.0, key
        assert pairs[key]["mma"][2] > 0.3, key
    s = res["summary"]
    assert s["num_pairs"]["viewpoint"] == 16 and s["num_pairs"]["illumination"] == 0
    assert 0 < s["dift"]["accuracy"]["all"][2] <= 1
    assert all(0 <= a <= 1 for a in s["gluefactory"]["auc"]["all"])
    assert s["mma"]["mma"]["all"] == sorted(s["mma"]["mma"]["all"])  # cumulative in thr
    assert s["mma"]["mean_num_keypoints"]["all"] == pytest.approx(1000, rel=0.01)


# --------------------------------------------------------------------------- DIFT models
def _tiny_sequence(root: Path) -> Path:
    seq = root / "v_tiny"
    seq.mkdir(parents=True)
    img = texture(96, 128, seed=5)
    H = _viewpoint_H(2, 128, 96)
    cv2.imwrite(str(seq / "1.png"), img)
    cv2.imwrite(str(seq / "2.png"), warp(img, H))
    _write_H(seq / "H_1_2", H)
    return seq


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dift-sd", "dift-adm"])
def test_dift_confs_run_the_benchmark(name, tmp_path):
    """The benchmark path with the tiny conformance models (numbers are meaningless). The
    glue-factory protocol differs only in its image copies, tested with SIFT above."""
    model = {"dift-sd": SHARED / "conformance" / "sd" / "model",
             "dift-adm": SHARED / "conformance" / "adm" / "adm_small_a_weights.safetensors"}[name]
    if not model.exists():
        pytest.skip(f"conformance model {model} not found")
    seq = _tiny_sequence(tmp_path)
    overrides = {"featurizer.model": str(model), "featurizer.img_size": [64, 64],
                 "featurizer.ensemble": 1, "featurizer.device": "cpu"}
    if name == "dift-adm":
        overrides["featurizer.output_block"] = 5
    start = time.perf_counter()
    res = run_hpatches(get_conf(name, overrides), seq, tmp_path / "out",
                       protocols=["dift", "mma"], max_keypoints=64, num_viz=1)
    assert res["summary"]["dift"]["estimator"] == ("lmeds" if name == "dift-sd" else "ransac")
    (p,) = res["pairs"]
    assert p["num_keypoints0"] == 64 and p["num_matches"] > 0
    assert len(p["mma"]) == 10 and "corner_error" in p["dift"]
    assert (tmp_path / "out" / "matches_v_tiny_1_2.png").is_file()
    if os.environ.get("DIFT_SFM_TIMING"):
        print(f"{name}: {time.perf_counter() - start:.1f} s")
