"""Shared fixtures: paths to ../shared and synthetic, real-looking images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def interrupt_cli(args: list[str], parts: Path, pattern: str = "*.h5", delay: float = 0.0,
                  sig: int = signal.SIGKILL, **popen) -> subprocess.Popen:
    """Start ``dift-sfm ARGS`` in a subprocess, wait until a file matching ``pattern`` exists
    in ``parts`` (an output's shard folder; 120 s at most), wait ``delay`` more, then send
    ``sig`` (kill -9 by default) and wait for the process. Returns the finished process."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    proc = subprocess.Popen([sys.executable, "-m", "dift_sfm.cli", *args],
                            **{"env": CLI_ENV, **popen})
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts.glob(pattern)) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(delay)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    return proc


#: what must never appear on stderr of an interrupted command: Python tracebacks, glog's
#: native stack dump (pycolmap), a swallowed interrupt, Ray's ``sys.exit(15)``
NOT_LIKE_CTRL_C = ("Traceback", "*** SIGTERM", "Check failure", "Exception ignored",
                   "SystemExit")


def sigterm_cli(args: list[str], parts: Path, pattern: str = "*", delay: float = 0.0,
                timeout: float = 120, **popen) -> str:
    """``interrupt_cli`` with SIGTERM, then check it ended like Ctrl-C: exit code 130, one
    ERROR line saying finished work is kept, none of NOT_LIKE_CTRL_C. Returns stderr."""
    proc = interrupt_cli(args, parts, pattern, delay, sig=signal.SIGTERM,
                         stderr=subprocess.PIPE, text=True, **popen)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 130, err[-3000:]
    errors = [line for line in err.splitlines() if " ERROR]" in line]
    assert len(errors) == 1 and "Interrupted; completed work is kept" in errors[0], err[-3000:]
    assert not [bad for bad in NOT_LIKE_CTRL_C if bad in err], err[-3000:]
    return err


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A real-looking (H, W, 3) uint8 texture: multi-scale noise plus random shapes and text."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for octave in range(1, 7):
        s = 2 ** octave
        small = rng.random((h // s + 2, w // s + 2, 3)).astype(np.float32)
        img += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) / octave
    img = (img - img.min()) / (img.max() - img.min()) * 255
    img = img.astype(np.uint8)
    for _ in range(40):
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(4, max(5, min(h, w) // 8)))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, color, -1)
        else:
            cv2.rectangle(img, (x, y), (x + r, y + int(r * 1.5)), color, -1)
    for _ in range(6 if min(h, w) > 60 else 0):
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(20, h))
        cv2.putText(img, "DIFT" + str(rng.integers(100)), (x, y), cv2.FONT_HERSHEY_SIMPLEX,
                    0.6 + rng.random(), (255, 255, 255), 2)
    return img


def texture_folder(folder: Path, count: int, h: int = 240, w: int = 320) -> Path:
    """``folder`` (created) holding ``count`` textures ``00.png``, ``01.png``, ... (seeds 0..)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:02d}.png"), texture(h, w, seed=i))
    return folder


def warp(img: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Warp ``img`` by homography H (image-0 pixels to image-1 pixels, centres at integers)."""
    return cv2.warpPerspective(img, H, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip with a message."""
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (real-photo tests need ../shared/data)")
    return DATA


@pytest.fixture
def synthetic_pair(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A folder with a.png and b.png = a warped by a known homography H (returned)."""
    img = texture(360, 480, seed=1)
    H = np.array([[0.9, 0.08, 20.0], [-0.06, 0.95, 15.0], [1e-4, -5e-5, 1.0]])
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), img)
    cv2.imwrite(str(folder / "b.png"), warp(img, H))
    return folder, H


def h5_datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an h5 file, by its path in the file."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda key, item: found.__setitem__(key, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return found


def assert_same_h5(a: Path, b: Path) -> None:
    """Both files hold the same datasets: same paths, dtypes and values."""
    da, db = h5_datasets(a), h5_datasets(b)
    assert sorted(da) == sorted(db)
    for key, value in da.items():
        assert value.dtype == db[key].dtype and np.array_equal(value, db[key]), key
