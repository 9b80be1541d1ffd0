"""`--ray`: extraction and matching on a real local Ray cluster (2 CPUs) give the files of the
single-process run; worker and driver kills; errors."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from conftest import DATA, REPO, SHARED, assert_same_h5, texture

ray = pytest.importorskip("ray")

from dift_sfm.confs import get_conf  # noqa: E402
from dift_sfm.distributed import (  # noqa: E402
    NAMESPACE,
    RayClusterError,
    RayExtractBackend,
    RayMatchBackend,
    RayOptions,
    RayUnavailableError,
    import_ray,
    worker_pids,
)
from dift_sfm.errors import ImageReadError, PartialFailure  # noqa: E402
from dift_sfm.extract import extract_features  # noqa: E402
from dift_sfm.formats.h5store import ShardedH5Writer  # noqa: E402
from dift_sfm.images import decode_image, read_image  # noqa: E402
from dift_sfm.match import match_features  # noqa: E402
from dift_sfm.pairs import exhaustive_pairs, write_pairs  # noqa: E402

SACRE = DATA / "sacre_coeur"
TINY_SD = SHARED / "conformance" / "sd" / "model"
SIFT = {"preprocessing.resize_max": 480, "keypoints.max_keypoints": 1024}


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray cluster of 2 CPUs for the whole module; yields its address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE,
             logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def sacre() -> list[str]:
    if not SACRE.is_dir():
        pytest.skip(f"shared photos not found at {SACRE} (needs ../shared/data)")
    return sorted(p.name for p in SACRE.glob("*.jpg"))


@pytest.fixture(scope="module")
def sift_reference(sacre, tmp_path_factory) -> Path:
    """features.h5 of the sacre_coeur photos written by the single-process run."""
    out = tmp_path_factory.mktemp("ref") / "feats.h5"
    return extract_features(get_conf("sift", SIFT), SACRE, out)


# --------------------------------------------------------------------------- no cluster needed
def test_decode_image_is_read_image(tmp_path: Path):
    """Bytes decoded on a worker give the array read_image gives, errors worded the same."""
    img = texture(40, 50, seed=3)
    cases = {"rgb.png": img, "grey.png": img[..., 0],
             "deep.png": img.astype(np.uint16) * 257,
             "alpha.png": np.dstack([img, img[..., :1]]), "photo.jpg": img}
    for name, data in cases.items():
        cv2.imwrite(str(tmp_path / name), data)
    if SACRE.is_dir():
        shutil.copy(next(SACRE.glob("*.jpg")), tmp_path / "real.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    for path in sorted(tmp_path.iterdir()):
        try:
            expected = read_image(path)
        except ImageReadError as err:
            with pytest.raises(ImageReadError) as got:
                decode_image(path.read_bytes(), path)
            assert str(got.value) == str(err)
            continue
        got = decode_image(path.read_bytes(), path)
        assert got.dtype == expected.dtype and np.array_equal(got, expected), path.name


def test_ray_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailableError, match=r'pip install "dift-sfm\[ray\]"'):
        import_ray()


def test_without_ray_flag_ray_is_not_imported(tmp_path: Path):
    cv2.imwrite(str(tmp_path / "a.png"), texture(64, 80, seed=1))
    code = ("import sys; from dift_sfm.cli import main; "
            f"rc = main(['-q', 'extract', {str(tmp_path)!r}, '-o', {str(tmp_path / 'f.h5')!r}]);"
            "assert rc == 0 and 'ray' not in sys.modules, sorted(m for m in sys.modules "
            "if m.startswith('ray'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_unreachable_address_is_one_clear_line(tmp_path: Path):
    cv2.imwrite(str(tmp_path / "a.png"), texture(64, 80, seed=1))
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "dift_sfm.cli", "-q", "extract", str(tmp_path),
                          "-o", str(tmp_path / "f.h5"), "--ray", "--ray-address",
                          "127.0.0.1:1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and time.monotonic() - start < 30
    assert "Could not reach the Ray cluster at '127.0.0.1:1'" in run.stderr
    assert "Traceback" not in run.stderr


# --------------------------------------------------------------------------- on the cluster
def test_gpu_conf_on_a_cluster_without_gpu(cluster, tmp_path: Path):
    cv2.imwrite(str(tmp_path / "a.png"), texture(64, 80, seed=1))
    conf = get_conf("dift-sd", {"featurizer.model": str(tmp_path / "none")})
    with pytest.raises(RayClusterError, match="no GPU.*--device cpu"):
        extract_features(conf, tmp_path, tmp_path / "f.h5",
                         backend=RayExtractBackend(conf, tmp_path, RayOptions()))


@pytest.fixture
def driver_calls(monkeypatch) -> dict[str, int]:
    """Counts the driver's ``ShardedH5Writer.write`` and ``add_piece`` calls (the real ones
    run)."""
    calls = {"write": 0, "add_piece": 0}
    for method in calls:
        real = getattr(ShardedH5Writer, method)

        def counted(self, *args, _real=real, _method=method, **kwargs):
            calls[_method] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(ShardedH5Writer, method, counted)
    return calls


def test_sift_extract_and_match_equal_single_process(cluster, sacre, sift_reference,
                                                     tmp_path: Path, driver_calls):
    conf = get_conf("sift", SIFT)
    # 1 worker: preparation runs as tasks on the other CPU
    backend = RayExtractBackend(conf, SACRE, RayOptions(workers=1))
    out = extract_features(conf, SACRE, tmp_path / "feats.h5", backend=backend)
    assert backend.stats["prep_slots"] == 1
    assert_same_h5(sift_reference, out)
    # the workers packed each batch (sift: 1 image) into a piece; the driver wrote no entry
    assert driver_calls == {"write": 0, "add_piece": len(sacre)}

    pairs = tmp_path / "pairs.txt"
    write_pairs(pairs, exhaustive_pairs(sacre))
    local = match_features(conf, pairs, out, tmp_path / "local.h5")
    assert driver_calls["write"] == len(exhaustive_pairs(sacre))  # the local backend's
    matcher = RayMatchBackend(conf["matcher"], RayOptions(workers=2, block_images=4,
                                                          window_pairs=16))
    got = match_features(conf, pairs, out, tmp_path / "ray.h5", backend=matcher)
    assert matcher.stats["blocks"] > 3  # several windows and blocks, one piece each
    assert driver_calls["add_piece"] == len(sacre) + matcher.stats["blocks"]
    assert driver_calls["write"] == len(exhaustive_pairs(sacre))  # none more
    assert_same_h5(local, got)
    with h5py.File(got, "r") as f, h5py.File(local, "r") as g:  # provenance as well
        for key in ("/".join(p) for p in exhaustive_pairs(sacre)[:5]):
            assert dict(f[key].attrs) == dict(g[key].attrs) and len(f[key].attrs) == 2


def test_backends_hand_over_single_results_without_storage(cluster, sacre, tmp_path: Path):
    """Called without a storage (e.g. by another driver), the backends yield results one by
    one, as before pieces."""
    from dift_sfm.extract import Described

    conf = get_conf("sift", SIFT)
    got = list(RayExtractBackend(conf, SACRE, RayOptions(workers=1))(sacre[:2]))
    assert [n for n, _ in got] == sacre[:2]
    assert all(isinstance(r, Described) and len(r.descriptors) for _, r in got)


def test_worker_killed_during_extract(cluster, sacre, sift_reference, tmp_path: Path):
    """SIGKILL one describe worker mid-run: Ray restarts it and re-runs its in-flight images."""
    conf = get_conf("sift", SIFT)
    backend = RayExtractBackend(conf, SACRE, RayOptions(workers=2))  # preparation in actors
    killed: list[int] = []

    def killing_backend(names):
        for i, outcome in enumerate(backend(names)):
            if i == 0:
                killed.append(worker_pids(backend)[0])
                os.kill(killed[0], signal.SIGKILL)
            yield outcome

    out = extract_features(conf, SACRE, tmp_path / "feats.h5", backend=killing_backend)
    assert_same_h5(sift_reference, out)
    assert killed[0] > 0


def test_driver_killed_then_rerun_resumes(cluster, sacre, sift_reference, tmp_path: Path):
    out = tmp_path / "feats.h5"
    sets = [a for k, v in SIFT.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "dift_sfm.cli", "-q", "extract", str(SACRE), "-o", str(out),
           *sets, "--ray", "--ray-address", cluster, "--workers", "1"]
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    parts = out.with_name(out.name + ".parts")
    deadline = time.monotonic() + 60
    while not any(parts.glob("*")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a few images into the shard
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read().decode()[-2000:]
    assert not out.exists() and parts.is_dir()
    # the rerun (without --ray: runs move between modes) keeps the finished images
    extract_features(get_conf("sift", SIFT), SACRE, out)
    assert_same_h5(sift_reference, out)


def test_bad_input_same_errors_with_and_without_ray(cluster, tmp_path: Path, caplog):
    from dift_sfm.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"good{i}.png"), texture(90, 120, seed=20 + i))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    cv2.imwrite(str(images / "tiny.png"), texture(8, 8, seed=5))  # under preprocessing.min_size
    runs = {}
    for mode, extra in (("local", []), ("ray", ["--ray", "--workers", "1"])):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="dift_sfm"):
            logging.getLogger("dift_sfm").addHandler(caplog.handler)
            try:
                rc = main(["extract", str(images), "-o", str(tmp_path / f"{mode}.h5"), *extra])
            finally:
                logging.getLogger("dift_sfm").removeHandler(caplog.handler)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        runs[mode] = (rc, [e.replace(f"{mode}.h5", "OUT.h5") for e in errors])
    assert runs["local"] == runs["ray"]
    rc, errors = runs["ray"]
    assert rc == 1 and any("broken.jpg" in e for e in errors) and any("tiny.png" in e
                                                                        for e in errors)
    assert_same_h5(tmp_path / "local.h5", tmp_path / "ray.h5")
    assert sorted(h5py.File(tmp_path / "ray.h5", "r")) == ["good0.png", "good1.png",
                                                            "good2.png"]


def test_tiny_sd_extract_and_match_equal_single_process(cluster, tmp_path: Path):
    """The SD featurizer seeds every image alike: an actor's results do not depend on what
    it described before, and batches are formed as the local run forms them."""
    if not (TINY_SD / "unet").is_dir():
        pytest.skip(f"tiny SD conformance model not found at {TINY_SD}")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        cv2.imwrite(str(images / f"im{i}.png"), texture(96, 128, seed=30 + i))
    (images / "im2b.png").write_bytes(b"broken")  # an error splits a batch, in both runs
    conf = get_conf("dift-sd", {"featurizer.model": str(TINY_SD), "featurizer.device": "cpu",
                                "featurizer.img_size": [64, 64], "featurizer.ensemble": 2,
                                "featurizer.batch_size": 2, "keypoints.max_keypoints": 64})
    # on CPU, torch's float sums depend on its thread count: compare at the actors' count (1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(PartialFailure):
            extract_features(conf, images, tmp_path / "local.h5")
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(PartialFailure):
        extract_features(conf, images, tmp_path / "ray.h5",
                         backend=RayExtractBackend(conf, images, RayOptions(workers=2)))
    assert_same_h5(tmp_path / "local.h5", tmp_path / "ray.h5")
    names = [f"im{i}.png" for i in range(5)]
    write_pairs(tmp_path / "pairs.txt", exhaustive_pairs(names))
    local = match_features(conf, tmp_path / "pairs.txt", tmp_path / "local.h5",
                           tmp_path / "m_local.h5")
    got = match_features(conf, tmp_path / "pairs.txt", tmp_path / "local.h5",
                         tmp_path / "m_ray.h5",
                         backend=RayMatchBackend(conf["matcher"], RayOptions(block_images=4)))
    assert_same_h5(local, got)


def test_reconstruct_with_ray_writes_the_single_process_files(cluster, sacre, tmp_path: Path):
    """`reconstruct --ray` passes the cluster to both steps: the same features and matches as
    the single-process pipeline, hence the same model."""
    from dift_sfm.sfm import run_pipeline

    conf = get_conf("sift", SIFT)
    _, local = run_pipeline(conf, SACRE, tmp_path / "local", min_model_size=2)
    _, remote = run_pipeline(conf, SACRE, tmp_path / "ray", min_model_size=2,
                             ray=RayOptions(workers=2))
    for name in (f"{conf['output']}.h5", f"{conf['output']}_matches.h5"):
        assert_same_h5(tmp_path / "local" / name, tmp_path / "ray" / name)
    assert remote.num_registered == local.num_registered >= 2
    assert set(remote.timings) >= {"extract", "match", "mapping"}
