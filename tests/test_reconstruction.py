"""COLMAP reconstruction, colmap-import and retrieval pairs, on real databases and real images.

(a) A synthetic scene with known cameras: the three textured inner faces of a box corner
    (floor z=0, walls x=0 and y=0, 4 x 4 units), seen from 8 cameras in the positive octant.
    From there every viewing ray meets at most one face (a concave corner seen from inside), so
    the faces composite without a z-buffer. Each face is rendered with its exact plane-induced
    homography at 2x and area-downsampled (anti-aliasing).
(b) The 10 Sacre Coeur photos of ../shared/data (skipped when absent).
(c) Bad input: unreadable image, duplicate names, unknown images in a pairs file, a database
    locked by another process, importing into a database COLMAP made, refusing to overwrite.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest
from conftest import CLI_ENV, sigterm_cli, texture, warp

from dift_sfm.cli import main as cli_main
from dift_sfm.colmap.database import (
    DatabaseError,
    DatabaseLockedError,
    check_image_names,
    create_database,
    import_into_database,
)
from dift_sfm.confs import get_conf
from dift_sfm.errors import DiftSfmError, FormatError
from dift_sfm.formats.features import list_names, read_keypoints
from dift_sfm.formats.matches import read_matches
from dift_sfm.pairs import exhaustive_pairs, read_pairs, write_pairs
from dift_sfm.retrieval import pairs_from_descriptors, retrieval_pairs
from dift_sfm.sfm import run_pipeline

SACRE_COEUR = Path(__file__).resolve().parents[2] / "shared" / "data" / "sacre_coeur"
W, H, F = 640, 480, 560.0
SIFT = {"keypoints.max_keypoints": 2048}


# --------------------------------------------------------------------------- synthetic scene
def procedural_texture(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) float32 texture in [0, 1]: multi-scale colour noise, blobs and edges."""
    rng = np.random.default_rng(seed)
    tex = np.zeros((size, size, 3), np.float32)
    for cells, amp in ((4, 0.35), (8, 0.3), (16, 0.25), (32, 0.2), (64, 0.15), (128, 0.1)):
        noise = rng.random((cells, cells, 3)).astype(np.float32) - 0.5
        tex += amp * cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    img = np.ascontiguousarray((tex * 255).astype(np.uint8))
    for _ in range(220):  # blobs
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(4, 40, 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)
    for _ in range(80):  # edges and corners
        p0 = rng.integers(0, size, 2)
        p1 = p0 + rng.integers(-120, 120, 2)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.rectangle(img, tuple(int(v) for v in p0), tuple(int(v) for v in p1), color,
                          int(rng.integers(-1, 6)) or -1, cv2.LINE_AA)
        else:
            cv2.line(img, tuple(int(v) for v in p0), tuple(int(v) for v in p1), color,
                     int(rng.integers(1, 6)), cv2.LINE_AA)
    return img.astype(np.float32) / 255.0


def look_at(centre: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cam_from_world (R, t) of a camera at ``centre`` looking at ``target``, world z up."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])
    return R, -R @ centre


def render_scene(out_dir: Path, num_views: int = 8, side: float = 4.0, tex_size: int = 1024,
                 seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Render the box-corner scene into ``out_dir``; returns name -> (R, t) cam_from_world."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # plane: origin O and in-plane unit axes a, b; points O + u a + v b, u, v in [0, side]
    planes = [(np.zeros(3), np.eye(3)[0], np.eye(3)[1]),  # floor z = 0
              (np.zeros(3), np.eye(3)[1], np.eye(3)[2]),  # wall x = 0
              (np.zeros(3), np.eye(3)[0], np.eye(3)[2])]  # wall y = 0
    textures = [procedural_texture(tex_size, seed + 1 + i) for i in range(len(planes))]
    # K at 2x: a pixel centre x1 (integers at centres) sits at 2 x1 + 0.5 in the 2x image.
    K2 = np.array([[2 * F, 0, 2 * (W - 1) / 2 + 0.5], [0, 2 * F, 2 * (H - 1) / 2 + 0.5],
                   [0, 0, 1]])
    texel = side / tex_size
    target = np.array([1.3, 1.3, 1.0])
    poses = {}
    for k in range(num_views):
        az = np.deg2rad(22 + 46 * k / (num_views - 1))
        el = np.deg2rad(26 if k % 2 else 36)
        dist = 7.5 + 0.6 * (k % 3)
        centre = target + dist * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az),
                                           np.sin(el)])
        R, t = look_at(centre, target + 0.15 * np.array([np.sin(k), np.cos(k), 0.0]))
        image = np.full((2 * H, 2 * W, 3), 0.5, np.float32)
        for (origin, a, b), tex in zip(planes, textures, strict=True):
            o = origin + (a + b) * 0.5 * texel  # centre of texel (0, 0)
            M = np.stack([R @ a * texel, R @ b * texel, R @ o + t], axis=1)
            Hm = K2 @ M
            warped = cv2.warpPerspective(tex, Hm, (2 * W, 2 * H), flags=cv2.INTER_LINEAR)
            mask = cv2.warpPerspective(np.ones(tex.shape[:2], np.float32), Hm, (2 * W, 2 * H),
                                       flags=cv2.INTER_LINEAR)[..., None]
            image = image * (1 - mask) + warped * mask
        small = cv2.resize(image, (W, H), interpolation=cv2.INTER_AREA)
        name = f"view_{k:02d}.png"
        cv2.imwrite(str(out_dir / name), (np.clip(small[..., ::-1], 0, 1) * 255 + 0.5)
                    .astype(np.uint8))
        poses[name] = (R, t)
    return poses


def rotation_angle(R: np.ndarray) -> float:
    return float(np.rad2deg(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))


def vector_angle(u: np.ndarray, v: np.ndarray) -> float:
    c = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.rad2deg(np.arccos(np.clip(c, -1, 1))))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The synthetic scene plus an unreadable image and a text file, reconstructed by the CLI."""
    root = tmp_path_factory.mktemp("scene")
    images = root / "images"
    poses = render_scene(images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "notes.txt").write_text("not an image\n")
    out = root / "out"
    argv = ["reconstruct", str(images), "--output", str(out), "--conf", "sift",
            "--max-keypoints", "2048", "--camera-mode", "single", "--min-model-size", "3"]
    assert cli_main(argv) == 1  # non-zero: broken.jpg was skipped (the model is written)
    assert (out / "sparse" / "0" / "images.bin").is_file()
    return {"images": images, "out": out, "poses": poses, "argv": argv}


def _read_model(out: Path) -> pycolmap.Reconstruction:
    rec = pycolmap.Reconstruction()
    rec.read(out / "sparse" / "0")
    return rec


@pytest.mark.slow
def test_synthetic_scene_poses_match_truth(scene):
    rec = _read_model(scene["out"])
    poses = scene["poses"]
    est = {im.name: im.cam_from_world() for im in rec.images.values() if im.has_pose}
    assert sorted(est) == sorted(poses), "every image registers"
    names = sorted(poses)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            Ra, ta = poses[a]
            Rb, tb = poses[b]
            R_true = Rb @ Ra.T  # cam_b_from_cam_a: invariant to a similarity of the world
            t_true = tb - R_true @ ta
            pa, pb = est[a], est[b]
            R_est = pb.rotation.matrix() @ pa.rotation.matrix().T
            t_est = pb.translation - R_est @ pa.translation
            assert rotation_angle(R_est @ R_true.T) < 1.0, (a, b)
            assert vector_angle(t_est, t_true) < 1.0, (a, b)
    cams = list(rec.cameras.values())
    assert len(cams) == 1  # --camera-mode single
    assert cams[0].mean_focal_length() == pytest.approx(F, rel=0.01)
    assert rec.compute_mean_reprojection_error() < 1.0
    assert rec.num_points3D() > 500


@pytest.mark.slow
def test_unreadable_image_is_reported_and_the_rest_reconstructed(scene, caplog):
    out = scene["out"]
    with pycolmap.Database.open(out / "database.db") as db:
        names = sorted(im.name for im in db.read_all_images())
    assert names == sorted(scene["poses"])  # no broken.jpg, no notes.txt
    assert "broken.jpg" not in list_names(out / "feats-sift.h5")
    # resume: features and matches are reused, the database and the model are rebuilt
    before = (out / "database.db").stat().st_ino
    with caplog.at_level(logging.INFO, logger="dift_sfm"):
        _, summary = run_pipeline(get_conf("sift", SIFT), scene["images"], out,
                                  camera_mode="single", min_model_size=3)
    assert "broken.jpg" in summary.failed_images
    assert "broken.jpg" in caplog.text and "unreadable" in caplog.text
    assert "Extracting sift features for 1 images (8 already done)" in caplog.text
    assert "Matching 0 pairs (28 already done)" in caplog.text
    assert (out / "database.db").stat().st_ino != before
    assert not (out / "database.db.tmp").exists()
    assert summary.num_registered == summary.num_images == 8
    assert summary.mean_track_length > 2


@pytest.mark.slow
@pytest.mark.shared
def test_sacre_coeur_all_images_register(tmp_path):
    if not SACRE_COEUR.is_dir():
        pytest.skip(f"{SACRE_COEUR} is absent (the shared data folder beside the checkout)")
    _, summary = run_pipeline(get_conf("sift"), SACRE_COEUR, tmp_path / "sc")
    assert summary.num_images == 10  # SOURCE_README.md skipped
    assert summary.num_registered == 10, summary.format()
    assert summary.num_points3D > 300
    assert summary.mean_reprojection_error < 1.5
    assert (tmp_path / "sc" / "sparse" / "0" / "points3D.bin").is_file()
    # "verified pairs" counts pairs with inliers, not every pair COLMAP tried
    with sqlite3.connect(tmp_path / "sc" / "database.db") as con:
        tried, with_inliers = con.execute(
            "SELECT COUNT(*), SUM(rows > 0) FROM two_view_geometries").fetchone()
    assert summary.num_verified_pairs == with_inliers <= tried == 45


# --------------------------------------------------------------------------- bad input
def test_duplicate_names_are_refused(tmp_path):
    with pytest.raises(DatabaseError, match="'a.jpg' and 'a.JPG'.*letter case"):
        check_image_names(["a.jpg", "b.jpg", "a.JPG"])
    with pytest.raises(DatabaseError, match="'x/b.jpg' and 'x-b.jpg'"):
        check_image_names(["x/b.jpg", "x-b.jpg"])
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "a.JPG"):
        cv2.imwrite(str(images / name), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DiftSfmError, match="a.JPG"):
        run_pipeline(get_conf("sift"), images, tmp_path / "out")
    assert not (tmp_path / "out" / "feats-sift.h5").exists()  # refused before any work
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\na.jpg\n")
    with pytest.raises(DiftSfmError, match="Duplicate image names.*a.jpg"):
        run_pipeline(get_conf("sift"), images, tmp_path / "out", image_list=listing)


@pytest.mark.slow
def test_pairs_file_naming_unknown_images(scene, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("view_00.png view_01.png\nview_00.png ghost.png\n")
    with pytest.raises(FormatError, match=r"pairs.txt:2: image 'ghost.png'"):
        run_pipeline(get_conf("sift", SIFT), scene["images"], scene["out"], pairs=str(pairs))
    # the same against a database: nothing is written
    db = tmp_path / "db.db"
    create_database(db, scene["images"], ["view_00.png", "view_01.png"])
    bad = tmp_path / "bad.txt"
    bad.write_text("view_00.png view_02.png\n")
    with pytest.raises(DatabaseError, match="not in database.*view_02.png"):
        import_into_database(db, scene["out"] / "feats-sift.h5",
                             scene["out"] / "feats-sift_matches.h5", bad)
    with pycolmap.Database.open(db) as d:
        assert d.num_keypoints() == 0 and d.num_matches() == 0


def _colmap_db(scene, path: Path) -> Path:
    """A database as COLMAP's own image import makes it: cameras, rigs, frames, images."""
    pycolmap.Database.open(path).close()
    pycolmap.import_images(path, scene["images"], pycolmap.CameraMode.SINGLE,
                           sorted(scene["poses"]))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_colmap_import_into_colmap_database_then_map(scene, tmp_path):
    out = scene["out"]
    db = _colmap_db(scene, tmp_path / "colmap.db")
    feats, matches = out / "feats-sift.h5", out / "feats-sift_matches.h5"
    pairs = out / "pairs-exhaustive.txt"
    argv = ["colmap-import", "--database", str(db), "--features", str(feats),
            "--matches", str(matches), "--pairs", str(pairs)]
    assert cli_main(argv) == 0
    with pycolmap.Database.open(db) as d:
        ids = {im.name: im.image_id for im in d.read_all_images()}
        for name, image_id in ids.items():
            np.testing.assert_allclose(d.read_keypoints(image_id)[:, :2],
                                       read_keypoints(feats, name) + 0.5, atol=1e-5)
        for a, b in read_pairs(pairs):
            np.testing.assert_array_equal(d.read_matches(ids[a], ids[b]),
                                          read_matches(matches, a, b)[0])
        assert d.num_matched_image_pairs() == 28
    # refuse a second import (keypoints exist): exit code 1, database unchanged
    digest = _digest(db)
    assert cli_main(argv) == 1
    with pytest.raises(DatabaseError, match="already has keypoints.*--overwrite"):
        import_into_database(db, feats, matches, pairs)
    assert _digest(db) == digest
    # --overwrite replaces them (no duplicate rows)
    assert cli_main(argv + ["--overwrite"]) == 0
    with pycolmap.Database.open(db) as d:
        assert d.num_keypoints() == sum(len(read_keypoints(feats, n)) for n in ids)
        assert d.num_matched_image_pairs() == 28
    # and COLMAP maps it
    pycolmap.verify_matches(db, pairs)
    # a refusal counts each pair once, though it has raw matches and a two-view geometry
    result = subprocess.run([sys.executable, "-m", "dift_sfm.cli", *argv], env=CLI_ENV,
                            capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if " ERROR]" in line]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "for 28 pairs" in errors[0] and "56" not in errors[0]
    options = pycolmap.IncrementalPipelineOptions()
    options.min_model_size = 3
    models = pycolmap.incremental_mapping(db, scene["images"], tmp_path / "sparse", options)
    assert max(m.num_reg_images() for m in models.values()) == 8


@pytest.mark.slow
def test_locked_database_gives_clear_error_and_stays_unchanged(scene, tmp_path):
    db = _colmap_db(scene, tmp_path / "locked.db")
    digest = _digest(db)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         f"con = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
         "con.execute('BEGIN EXCLUSIVE')\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DatabaseLockedError, match="locked by another process.*Nothing was"):
            import_into_database(db, scene["out"] / "feats-sift.h5",
                                 scene["out"] / "feats-sift_matches.h5",
                                 scene["out"] / "pairs-exhaustive.txt", lock_timeout=0.2)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert _digest(db) == digest
    with pycolmap.Database.open(db) as d:
        assert d.num_keypoints() == 0 and d.num_images() == 8


def test_import_refuses_non_colmap_and_missing_databases(tmp_path):
    feats = tmp_path / "f.h5"
    feats.write_bytes(b"")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, [])
    import h5py

    with h5py.File(feats, "w"):
        pass
    with pytest.raises(DatabaseError, match="not a COLMAP database"):
        import_into_database(other, feats, feats, pairs)
    with pytest.raises(DatabaseError, match="does not exist"):
        import_into_database(tmp_path / "missing.db", feats, feats, pairs)
    assert not (tmp_path / "missing.db").exists()


def test_cameras_from_exif_and_camera_modes(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rgb = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    exif = pil.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS X"
    exif.get_ifd(0x8769)[0xA405] = 35  # FocalLengthIn35mmFilm
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        pil.fromarray(rgb).save(images / name, exif=exif)
    cv2.imwrite(str(images / "sub" / "d.png"), rgb[:400])  # no EXIF, another size
    names = ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.png"]

    def cameras(mode):
        db = tmp_path / f"{mode}.db"
        create_database(db, images, names, camera_mode=mode, camera_model="SIMPLE_PINHOLE")
        with pycolmap.Database.open(db) as d:
            cams = {c.camera_id: c for c in d.read_all_cameras()}
            return {im.name: cams[im.camera_id] for im in d.read_all_images()}

    auto = cameras("auto")
    # EXIF: 35 mm equivalent focal over the 43.27 mm full-frame diagonal, times the diagonal
    assert auto["a.jpg"].focal_length == pytest.approx(35 / 43.27 * 800, rel=1e-3)
    assert auto["a.jpg"].has_prior_focal_length
    assert auto["sub/d.png"].focal_length == pytest.approx(1.2 * 640)  # COLMAP's default guess
    assert not auto["sub/d.png"].has_prior_focal_length
    assert auto["a.jpg"].model_name == "SIMPLE_PINHOLE"
    assert auto["a.jpg"].camera_id == auto["b.jpg"].camera_id == auto["sub/c.jpg"].camera_id
    per_image = cameras("per-image")
    assert len({c.camera_id for c in per_image.values()}) == 4
    with pytest.raises(DatabaseError, match="sub/d.png.*same size"):
        cameras("single")
    assert not (tmp_path / "single.db").exists()  # no half-made database left behind
    with pytest.raises(DatabaseError, match="sub/d.png"):
        cameras("per-folder")
    with pytest.raises(DiftSfmError, match="Unknown camera model 'PINHOL'"):
        create_database(tmp_path / "x.db", images, names, camera_model="PINHOL")


# --------------------------------------------------------------------------- retrieval
def test_pairs_from_descriptors_unique_topk():
    names = ["a", "b", "c", "d", "e"]
    desc = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99], [0.7, 0.7]], np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    pairs = pairs_from_descriptors(names, desc, 1)
    assert ("a", "b") in pairs and ("c", "d") in pairs
    assert len({frozenset(p) for p in pairs}) == len(pairs)
    assert all(a != b for a, b in pairs)
    everything = pairs_from_descriptors(names, desc, 10)
    assert {frozenset(p) for p in everything} == {frozenset(p) for p in exhaustive_pairs(names)}


@pytest.mark.slow
def test_retrieval_separates_two_scenes(scene, tmp_path):
    """Synthetic views and Sacre Coeur photos mixed: neighbours stay within their scene."""
    if not SACRE_COEUR.is_dir():
        pytest.skip(f"{SACRE_COEUR} is absent")
    images = tmp_path / "mixed"
    images.mkdir()
    synth = sorted(scene["poses"])[:5]
    photos = sorted(p.name for p in SACRE_COEUR.glob("*.jpg"))[:5]
    for n in synth:
        (images / n).symlink_to(scene["images"] / n)
    for n in photos:
        (images / n).symlink_to(SACRE_COEUR / n)
    names = sorted(synth + photos)

    def same_scene(pairs):
        return all((a in synth) == (b in synth) for a, b in pairs)

    # the classical fallback (no features): each image's best match is from its own scene
    out = tmp_path / "pairs.txt"
    assert cli_main(["pairs", "retrieval", str(images), "-o", str(out),
                     "--num-neighbors", "1"]) == 0
    assert same_scene(read_pairs(out)) and len(read_pairs(out)) >= len(names) // 2
    # pooled stored local descriptors: VLAD keeps the top 3 in-scene, the mean the top 1
    from dift_sfm.extract import extract_features

    feats = extract_features(get_conf("sift", {"keypoints.max_keypoints": 512}), images,
                             tmp_path / "f.h5")
    vlad = retrieval_pairs(names, 3, feature_path=feats)
    assert same_scene(vlad) and len(vlad) >= len(names) * 3 // 2
    assert same_scene(retrieval_pairs(names, 1, feature_path=feats, method="mean"))


# --------------------------------------------------------------------------- issue 18
def _views_argv(scene, out: Path, listing: Path) -> list[str]:
    """`reconstruct` of the 8 readable views of the scene into ``out`` (exit code 0)."""
    listing.write_text("\n".join(sorted(scene["poses"])) + "\n")
    return ["reconstruct", str(scene["images"]), "-o", str(out), "--image-list", str(listing),
            "--conf", "sift", "--max-keypoints", "2048", "--camera-mode", "single",
            "--min-model-size", "3"]


@pytest.mark.slow
def test_racing_runs_on_one_folder_and_one_database(scene, tmp_path):
    """A second `reconstruct` into a folder, and a `colmap-import` into its database, while a
    first `reconstruct` works there: each stops at once with one line; the first finishes and
    leaves whole files. The first is held inside geometric verification (its new database
    written, the old one still in place) until both others are done: two real processes on a
    real database, no timing."""
    out = tmp_path / "out"
    shutil.copytree(scene["out"], out)  # finished features, matches, database.db and model
    argv = _views_argv(scene, out, tmp_path / "views.txt")
    paused, release = tmp_path / "paused", tmp_path / "release"
    holder = ("import pathlib, sys, time\n"
              "import dift_sfm.sfm as sfm\n"
              "verify = sfm.verify_database\n"
              "def held(*args, **kwargs):\n"
              f"    pathlib.Path({str(paused)!r}).touch()\n"
              f"    while not pathlib.Path({str(release)!r}).exists():\n"
              "        time.sleep(0.05)\n"
              "    return verify(*args, **kwargs)\n"
              "sfm.verify_database = held\n"
              "from dift_sfm.cli import main\n"
              f"sys.exit(main({argv!r}))\n")
    first = subprocess.Popen([sys.executable, "-c", holder], env=CLI_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not paused.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), first.communicate()[1][-3000:]
        digest = _digest(out / "database.db")
        second = subprocess.run([sys.executable, "-m", "dift_sfm.cli", *argv], env=CLI_ENV,
                                capture_output=True, text=True)
        importer = subprocess.run(
            [sys.executable, "-m", "dift_sfm.cli", "colmap-import", "--database",
             str(out / "database.db"), "--features", str(scene["out"] / "feats-sift.h5"),
             "--matches", str(scene["out"] / "feats-sift_matches.h5"), "--pairs",
             str(scene["out"] / "pairs-exhaustive.txt"), "--overwrite"],
            env=CLI_ENV, capture_output=True, text=True)
        for result in (second, importer):
            errors = [line for line in result.stderr.splitlines() if " ERROR]" in line]
            assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
            assert "Another dift-sfm process is writing" in errors[0]
            assert str(out / "database.db") in errors[0] and "Traceback" not in result.stderr
        assert _digest(out / "database.db") == digest  # untouched by both
        assert first.poll() is None  # the first still holds the folder
    finally:
        release.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    with pycolmap.Database.open(out / "database.db") as db:
        assert db.num_images() == 8 and db.num_verified_image_pairs() == 28
    assert _read_model(out).num_reg_images() == 8
    assert not list(out.glob("*.lock")) and not (out / "database.db.tmp").exists()


@pytest.mark.slow
def test_sigterm_during_reconstruct_then_rerun(scene, tmp_path):
    """SIGTERM while `reconstruct` extracts (pycolmap loaded): like Ctrl-C; the rerun goes on
    from the kept images and builds the model."""
    out = tmp_path / "out"
    argv = _views_argv(scene, out, tmp_path / "views.txt")
    sigterm_cli(argv, out / "feats-sift.h5.parts")
    assert not (out / "database.db").exists()
    rerun = subprocess.run([sys.executable, "-m", "dift_sfm.cli", *argv], env=CLI_ENV,
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _read_model(out).num_reg_images() == 8


def test_two_photos_without_a_model_say_why(tmp_path):
    """Two views of a plane with hundreds of inliers: the message must not claim too few
    verified matches, but give the inliers and the baseline rule that stopped COLMAP."""
    images = tmp_path / "images"
    images.mkdir()
    img = texture(360, 480, seed=1)
    H = np.array([[0.9, 0.08, 20.0], [-0.06, 0.95, 15.0], [1e-4, -5e-5, 1.0]])
    cv2.imwrite(str(images / "a.png"), img)
    cv2.imwrite(str(images / "b.png"), warp(img, H))
    result = subprocess.run([sys.executable, "-m", "dift_sfm.cli", "reconstruct", str(images),
                             "-o", str(tmp_path / "out")], env=CLI_ENV, capture_output=True,
                            text=True)
    errors = [line for line in result.stderr.splitlines() if " ERROR]" in line]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "too few verified matches" not in errors[0]
    best = int(errors[0].split("the best with ")[1].split()[0])
    assert best >= 100 and "1 pair(s) are verified" in errors[0] and "baseline" in errors[0]
