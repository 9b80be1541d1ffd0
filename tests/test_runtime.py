"""The runtime module: the thread policy (set by ``import dift_sfm``, never over the user's
values, the same results whatever the policy), device and budget rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
from conftest import CLI_ENV, DATA, REPO, SHARED, assert_same_h5, texture_folder

from dift_sfm import runtime

SACRE = DATA / "sacre_coeur"
TINY_SD = SHARED / "conformance" / "sd" / "model"
POLICY_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter whose environment has none of the OpenMP variables
    but ``env``; it prints one JSON line, returned parsed."""
    base = {k: v for k, v in CLI_ENV.items() if k not in POLICY_VARS}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, os, sys
{before}
import dift_sfm
from dift_sfm import runtime
torch_after = "torch" not in sys.modules
import torch
print(json.dumps({{"env": {{k: os.environ.get(k) for k in {vars!r}}},
                  "torch_imported_after": torch_after, "threads": torch.get_num_threads(),
                  "state": runtime.thread_policy_state}}))
"""


def test_import_sets_the_policy_before_torch():
    got = _python(PROBE.format(before="", vars=POLICY_VARS))
    assert runtime.THREAD_ENV == {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
    for key, value in runtime.THREAD_ENV.items():
        assert got["env"][key] == value
    assert got["env"]["OMP_WAIT_POLICY"] is None  # a short spin, not PASSIVE (see runtime)
    assert got["torch_imported_after"]  # so torch's OpenMP runtime reads the variable
    assert got["env"]["OMP_NUM_THREADS"] is None  # the thread count is left to torch / Ray
    assert got["state"]["env"] == runtime.THREAD_ENV
    assert got["threads"] == runtime.available_cpus()  # every core on a quiet machine


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"},
                                  {"KMP_BLOCKTIME": "0"}])
def test_the_users_openmp_settings_win(user):
    got = _python(PROBE.format(before="", vars=POLICY_VARS), **user)
    for key, value in user.items():
        assert got["env"][key] == value
    for key in runtime.THREAD_ENV:  # the user chose how OpenMP waits: nothing is added
        if key not in user:
            assert got["env"][key] is None
    assert got["state"]["env"] == {}


def test_torch_imported_first_falls_back_to_one_thread():
    got = _python(PROBE.format(before="import torch", vars=POLICY_VARS))
    assert got["state"]["torch_first"] and got["env"]["OMP_WAIT_POLICY"] is None
    if runtime.available_cpus() > 1:
        assert got["threads"] == 1 and got["state"]["num_threads"] == 1
    # a thread count the user chose is kept
    got = _python(PROBE.format(before="import torch", vars=POLICY_VARS), OMP_NUM_THREADS="2")
    assert got["threads"] == 2 and got["state"]["num_threads"] is None
    got = _python(PROBE.format(before="import torch; torch.set_num_threads(3)",
                               vars=POLICY_VARS))
    assert got["threads"] == 3 and got["state"]["num_threads"] is None


def test_cli_module_gets_the_policy(tmp_path: Path):
    """``python -m dift_sfm.cli`` imports the package (and so the policy) before any step."""
    code = ("import json, os, runpy, sys; sys.argv = ['dift-sfm', 'confs'];\n"
            "try:\n    runpy.run_module('dift_sfm.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(json.dumps({'policy': os.environ.get('GOMP_SPINCOUNT')}))")
    assert _python(code)["policy"] == runtime.THREAD_ENV["GOMP_SPINCOUNT"]


def test_ray_runtime_env_keeps_given_values(monkeypatch):
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(key, raising=False)
    assert runtime.ray_runtime_env()["env_vars"] == runtime.THREAD_ENV
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice, alone, is passed on
    env = runtime.ray_runtime_env({"pip": ["x"], "env_vars": {"A": "1"}})
    assert env == {"pip": ["x"], "env_vars": {"OMP_WAIT_POLICY": "ACTIVE", "A": "1"}}
    env = runtime.ray_runtime_env({"env_vars": {"OMP_WAIT_POLICY": "X"}})
    assert env["env_vars"]["OMP_WAIT_POLICY"] == "X"


def test_ray_workers_get_the_policy():
    """A Ray worker imports dift_sfm (to unpickle its task) before torch: the policy holds."""
    pytest.importorskip("ray")
    code = """
import json, os, sys
import ray
import dift_sfm.runtime as rt
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
probe = ray.remote(rt.thread_env)
print(json.dumps({"worker": ray.get(probe.remote()),
                  "pid_env": ray.get(ray.remote(lambda: os.environ.get("GOMP_SPINCOUNT"))
                                     .remote())}))
ray.shutdown()
"""
    got = _python(code)
    assert got["worker"] == runtime.THREAD_ENV
    assert got["pid_env"] == runtime.THREAD_ENV["GOMP_SPINCOUNT"]


def test_pool_opencv_threads_and_wants_cuda():
    assert runtime.pool_opencv_threads(0) is None and runtime.pool_opencv_threads(1) is None
    cpus = runtime.available_cpus()
    assert runtime.pool_opencv_threads(cpus + 1) == 1
    assert runtime.pool_opencv_threads(2) == max(1, cpus // 2)
    before = cv2.getNumThreads()
    assert runtime.set_opencv_threads(1) == before
    assert runtime.set_opencv_threads(before) == 1 and cv2.getNumThreads() == before
    assert runtime.wants_cuda("auto", True) and not runtime.wants_cuda("auto", False)
    assert runtime.wants_cuda(None, True) and runtime.wants_cuda("cuda:1", False)
    assert not runtime.wants_cuda("cpu", True) and not runtime.wants_cuda("mps", True)
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.OutOfMemoryError is getattr(torch, "OutOfMemoryError",
                                               torch.cuda.OutOfMemoryError)


# --------------------------------------------------------------------------- same results
#: thread policies a user may run under: ours on all cores (nothing set), PASSIVE, one
#: thread, the old spinning default, and a run whose preparation pool is off (OpenCV then
#: keeps its own threads)
POLICIES = {
    "ours": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one_thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    "spinning": {"OMP_WAIT_POLICY": "ACTIVE"},
}


def _cli(args: list[str], env: dict[str, str]) -> None:
    base = {k: v for k, v in CLI_ENV.items() if k not in POLICY_VARS}
    subprocess.run([sys.executable, "-m", "dift_sfm.cli", *args, "-q"], env={**base, **env},
                   cwd=REPO, check=True, timeout=900, capture_output=True)


def _run_sift(out: Path, images: Path, env: dict[str, str], extra: list[str]) -> None:
    out.mkdir()
    _cli(["extract", str(images), "-o", str(out / "f.h5"), "--conf", "sift",
          "--max-keypoints", "1024", *extra], env)
    _cli(["pairs", "exhaustive", str(images), "-o", str(out / "pairs.txt")], env)
    _cli(["match", str(out / "pairs.txt"), "--features", str(out / "f.h5"), "-o",
          str(out / "m.h5")], env)


def test_sift_results_identical_whatever_the_thread_policy(tmp_path: Path):
    if not SACRE.is_dir():
        pytest.skip(f"shared photos not found at {SACRE}")
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(SACRE.glob("*.jpg"))[:3]:
        (images / p.name).symlink_to(p)
    runs = {name: tmp_path / name for name in POLICIES}
    for name, env in POLICIES.items():
        _run_sift(runs[name], images, env, [])
    no_pool = tmp_path / "no_pool"  # OpenCV at its own thread count, no pool
    _run_sift(no_pool, images, POLICIES["passive"], ["--set", "preprocessing.num_workers=0"])
    for out in [*runs.values(), no_pool][1:]:
        assert_same_h5(runs["passive"] / "f.h5", out / "f.h5")
        assert_same_h5(runs["passive"] / "m.h5", out / "m.h5")


def test_tiny_sd_results_identical_whatever_the_wait_policy(tmp_path: Path):
    """The waiting policy changes no bit. (torch's CPU float sums may depend on the thread
    count, so both runs use the same count.)"""
    if not (TINY_SD / "unet").is_dir():
        pytest.skip(f"tiny SD conformance model not found at {TINY_SD}")
    images = texture_folder(tmp_path / "images", 3, 96, 128)
    threads = str(min(2, os.cpu_count() or 1))
    outs = []
    for name in ("PASSIVE", "ACTIVE"):
        out = tmp_path / f"{name}.h5"
        _cli(["extract", str(images), "-o", str(out), "--conf", "dift-sd", "--model",
              str(TINY_SD), "--device", "cpu", "--set", "featurizer.img_size=[64,64]",
              "--set", "featurizer.ensemble=2", "--max-keypoints", "64"],
             {"OMP_WAIT_POLICY": name, "OMP_NUM_THREADS": threads})
        outs.append(out)
    assert_same_h5(*outs)
