"""report.html as a user sees it: a real reconstruction (the rendered box-corner scene of
test_reconstruction, plus an unrelated photo and an unreadable file), opened in headless
Chromium; the page's own script writes what it drew into <body data-*> attributes, read back
with --dump-dom. Skips (with a message) where no Chromium is installed."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest
from conftest import texture
from test_hpatches import _pose_line, _render, _rot_y, _viewpoint_H, _write_H
from test_reconstruction import render_scene

from dift_sfm.cli import main as cli_main
from dift_sfm.confs import get_conf
from dift_sfm.eval.hpatches import run_hpatches
from dift_sfm.eval.pose import run_pose_benchmark
from dift_sfm.report.scene3d import frustum_lines
from dift_sfm.report.sources import load_scene
from dift_sfm.sfm import run_pipeline

SIFT = {"keypoints.max_keypoints": 2048}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no headless Chromium (Debian: apt-get install chromium; .ci/run installs it)")


def open_in_browser(page: Path, screenshot: Path | None = None) -> tuple[dict[str, str], str]:
    """(data-* attributes of <body> after the page's scripts ran, browser console log)."""
    with tempfile.TemporaryDirectory() as profile:
        flags = [chromium(), "--headless", "--no-sandbox", "--disable-dev-shm-usage",
                 "--enable-unsafe-swiftshader", f"--user-data-dir={profile}",
                 "--virtual-time-budget=20000", "--enable-logging=stderr", "--v=0"]
        proc = subprocess.run([*flags, "--dump-dom", page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=180)
        if screenshot is not None:
            subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1400,2600",
                            page.resolve().as_uri()], capture_output=True, timeout=180)
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, f"no <body> in the dumped DOM: {proc.stderr[-2000:]}"
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    console = "\n".join(line for line in proc.stderr.splitlines() if "CONSOLE" in line)
    return attrs, console


def assert_clean(attrs: dict[str, str], console: str) -> None:
    assert attrs.get("ready") == "1", attrs
    assert attrs.get("errors") == "0", console
    assert "Uncaught" not in console and "Error" not in console.replace("GL Driver", ""), console


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    render_scene(images)
    cv2.imwrite(str(images / "zz_unrelated.jpg"), texture(480, 640, seed=7))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = root / "out"
    argv = ["reconstruct", str(images), "--output", str(out), "--conf", "sift",
            "--max-keypoints", "2048", "--camera-mode", "single", "--min-model-size", "3"]
    assert cli_main(argv) == 1  # broken.jpg skipped; the model and its report are written
    return {"images": images, "out": out}


def _registered(out: Path) -> int:
    rec = pycolmap.Reconstruction()
    rec.read(out / "sparse" / "0")
    return rec.num_reg_images()


@pytest.mark.slow
def test_reconstruct_report_renders(run, tmp_path):
    out = run["out"]
    page = out / "report.html"
    html = page.read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html), "all inlined, offline"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timings"]["extract"] > 0 and summary["mapper"] == "incremental"
    # the unregistered images and why
    section = html[html.index('id="unregistered"'):html.index('id="scene"')]
    assert "zz_unrelated.jpg" in section and "broken.jpg" in section
    assert "unreadable, skipped" in section
    assert re.search(r"zz_unrelated.jpg</td><td>(no verified pair|too few inliers)", section)
    num_cards = html.count("<figure class=pair ")
    with pycolmap.Database.open(out / "database.db") as db:
        ids = {im.name: im.image_id for im in db.read_all_images()}
        pair_ids, counts = db.read_num_matches()
    with_unrelated = 0
    for pid, count in zip(pair_ids, counts, strict=True):
        if ids["zz_unrelated.jpg"] in pycolmap.pair_id_to_image_pair(pid) and count > 0:
            with_unrelated += 1
    # 2 best, 2 median, 2 worst verified pairs (28 distinct), then 3 per unregistered image
    assert num_cards == 6 + min(3, with_unrelated)

    shot = tmp_path / "report.png"
    attrs, console = open_in_browser(page, screenshot=shot)
    assert_clean(attrs, console)
    assert attrs["figures"] == "2"
    assert int(attrs["cameras"]) == _registered(out) == 8
    assert int(attrs["graph_nodes"]) == 10  # 9 images in the database + broken.jpg
    assert int(attrs["pairs"]) == num_cards
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[1] == 1400
    assert image.std() > 20, "the screenshot is not blank"
    # the colour buttons restyle the points: press "error" from a script
    press = tmp_path / "press.html"
    press.write_text(html.replace("</body>", _PRESS_ERROR + "</body>"))
    attrs, console = open_in_browser(press)
    assert_clean(attrs, console)
    rec = pycolmap.Reconstruction()
    rec.read(out / "sparse" / "0")
    assert int(attrs["restyled"]) == rec.num_points3D()
    assert attrs["colorbar"] == "reproj. error [px]"


_PRESS_ERROR = """<script>setTimeout(function(){var gd=document.getElementById('fig0');
var b=gd.layout.updatemenus[0].buttons.filter(function(b){return b.label==='error';})[0];
Plotly.restyle(gd,b.args[0],b.args[1]).then(function(){
document.body.dataset.restyled=gd.data[0].marker.color.length;
document.body.dataset.colorbar=gd.data[0].marker.colorbar.title.text;});},500);</script>"""


@pytest.mark.slow
def test_report_from_h5_files_and_model_folder(run, tmp_path):
    """`dift-sfm report` on a bare model folder with our h5 files (no database): inliers are
    the matches triangulated into one 3D point."""
    out = run["out"]
    model = tmp_path / "model"
    shutil.copytree(out / "sparse" / "0", model)
    page = tmp_path / "r.html"
    pairs = next(out.glob("pairs-*.txt"))
    assert cli_main(["report", str(model), "--features", str(out / "feats-sift.h5"),
                     "--matches", str(out / "feats-sift_matches.h5"), "--pairs", str(pairs),
                     "--images", str(run["images"]), "-o", str(page)]) == 0
    data = load_scene(model, features=out / "feats-sift.h5",
                      matches=out / "feats-sift_matches.h5", pairs=pairs)
    assert data.inlier_source.startswith("triangulated")
    best = max(data.pairs, key=lambda p: p.num_inliers)
    assert 100 < best.num_inliers <= best.num_matches
    assert "zz_unrelated.jpg" in data.reasons
    attrs, console = open_in_browser(page)
    assert_clean(attrs, console)
    assert int(attrs["cameras"]) == 8
    assert int(attrs["pairs"]) == page.read_text().count("<figure class=pair ") >= 6
    # no database, no matches: a model alone still gives the 3D view
    assert cli_main(["report", str(model), "-o", str(tmp_path / "bare.html")]) == 0
    attrs, console = open_in_browser(tmp_path / "bare.html")
    assert_clean(attrs, console)
    assert int(attrs["cameras"]) == 8 and "pairs" not in attrs
    assert cli_main(["report", str(tmp_path)]) == 1  # no model there: one clear error


@pytest.mark.slow
def test_report_failure_is_a_warning_and_the_model_is_kept(run, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    (out / "report.html").unlink()
    (out / "report.html").mkdir()  # the report cannot be written there
    with caplog.at_level(logging.INFO, logger="dift_sfm"):
        _, summary = run_pipeline(get_conf("sift", SIFT), run["images"], out,
                                  camera_mode="single", min_model_size=3)
    assert summary.num_registered == _registered(out) == 8  # the reconstruction is there
    assert "Could not write the report" in caplog.text and "is kept" in caplog.text
    assert (out / "report.html").is_dir()


@pytest.mark.slow
def test_decimation_and_frusta(run):
    out = run["out"]
    data = load_scene(out, max_points=500)
    assert len(data.xyz) == 500 < data.num_points
    assert np.all(data.track_length >= 2) and np.all(data.error >= 0)
    again = load_scene(out, max_points=500)
    np.testing.assert_array_equal(data.xyz, again.xyz)  # seeded subset
    # each frustum: apex at the camera centre, corners projecting to the image corners
    lines = frustum_lines(data.views, scale=0.3)
    per_view = len(lines) // len(data.views)
    for k, v in enumerate(data.views):
        seg = lines[k * per_view:(k + 1) * per_view]
        np.testing.assert_allclose(seg[5], v.centre, atol=1e-4)
        cam = (seg[:4] - v.centre) @ v.world_from_cam  # world -> camera frame
        px = cam @ v.K.T
        px = px[:, :2] / px[:, 2:]
        w, h = v.size
        np.testing.assert_allclose(px, [[0, 0], [w, 0], [w, h], [0, h]], atol=1e-2)


@pytest.mark.slow
def test_benchmark_pages(tmp_path):
    # HPatches layout: one viewpoint sequence of 4 images
    root = tmp_path / "hp"
    seq = root / "v_synth"
    seq.mkdir(parents=True)
    img = texture(240, 320, seed=11)
    cv2.imwrite(str(seq / "1.ppm"), img)
    for k in range(2, 5):
        H = _viewpoint_H(k, 320, 240)
        cv2.imwrite(str(seq / f"{k}.ppm"), cv2.warpPerspective(img, H, (320, 240)))
        _write_H(seq / f"H_1_{k}", H)
    hp_out = tmp_path / "hp_out"
    results = run_hpatches(get_conf("sift"), root, hp_out, protocols=("dift", "mma"),
                           max_keypoints=400, num_viz=1)
    page = hp_out / "report.html"
    html = page.read_text()
    links = re.findall(r'href="(matches_[^"]+\.png)"', html)
    assert len(links) == 1 and (hp_out / links[0]).is_file()
    attrs, console = open_in_browser(page)
    assert_clean(attrs, console)
    assert attrs["figures"] == "2"  # MMA and accuracy curves
    assert html[html.index('id="pairs"'):].count("<tr>") - 1 == len(results["pairs"]) == 3

    # pose benchmark: two rendered views of a textured box
    K = np.array([[380.0, 0, 239.5], [0, 380.0, 179.5], [0, 0, 1]])
    textures = [texture(720, 720, seed=s) for s in (21, 22, 23)]
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "view0.png"), _render(K, np.eye(3), np.zeros(3), (480, 360),
                                                   textures))
    R, t = _rot_y(8.0), np.array([-0.4, 0.05, 0.1])
    cv2.imwrite(str(images / "view1.png"), _render(K, R, t, (480, 360), textures))
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    gt = tmp_path / "pairs_with_gt.txt"
    gt.write_text(_pose_line("view0.png", "view1.png", K, K, T) + "\n")
    pose_out = tmp_path / "pose"
    run_pose_benchmark(get_conf("sift", {"keypoints.max_keypoints": 1500}), gt, images,
                       pose_out)
    attrs, console = open_in_browser(pose_out / "report.html")
    assert_clean(attrs, console)
    assert attrs["figures"] == "1"
    assert "view1.png" in (pose_out / "report.html").read_text()
