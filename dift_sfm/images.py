"""Image discovery, reading and resizing.

Images are read on COLMAP's raw pixel grid: EXIF orientation is ignored, so keypoints written
by dift-sfm line up with what COLMAP and hloc read from the same file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from .errors import DiftSfmError, ImageReadError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp",
                    ".tif", ".tiff", ".webp"}

# Above this many pixels an image is refused rather than exhausting memory (about 2 GiB as
# float32 RGB). resize_max is applied after reading, so it cannot help here.
MAX_PIXELS = 180_000_000

#: The ``preprocessing`` conf section at its defaults: ``resize_max`` (longer side, px, or None)
#: before keypoints and description; ``min_size`` (shorter side, px) below which an image is
#: refused; ``as_half`` stores descriptors as float16; ``num_workers``: workers that read,
#: resize and detect ahead of the featurizer (None: min(8, CPU cores); 0: none), threads or
#: spawned processes (``worker_type``: 'thread' | 'process').
PREPROCESSING_DEFAULTS = {"resize_max": None, "min_size": 16, "as_half": False,
                          "num_workers": None, "worker_type": "thread"}


def list_images(image_dir: Path | str) -> list[str]:
    """Relative POSIX paths of every image below ``image_dir`` (recursive), sorted.

    Files whose extension is not an image extension (case-insensitive) are skipped, so text
    files and hidden files in photo folders do no harm.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise DiftSfmError(f"Image directory {root} does not exist or is not a directory.")
    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return names


def read_image_list(path: Path | str) -> list[str]:
    """Read an image list: one name per line, blank lines and '#' comments ignored.

    Only the first whitespace-separated token counts (hloc query lists carry intrinsics after it).
    """
    path = Path(path)
    if not path.exists() or path.is_dir():  # a pipe (`<(ls *.jpg)`) is a valid list
        raise DiftSfmError(f"Image list {path} does not exist.")
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line.split()[0])
    return names


def resolve_image_list(image_dir: Path | str,
                       image_list: Path | str | list[str] | None) -> list[str]:
    """The image names to process: ``image_list`` (a file or a list) or every image found.

    Raises DiftSfmError for an empty result or duplicated names.
    """
    if image_list is None:
        names = list_images(image_dir)
        source = f"image directory {image_dir}"
    elif isinstance(image_list, (str, Path)):
        names = read_image_list(image_list)
        source = f"image list {image_list}"
    else:
        names = [str(n) for n in image_list]
        source = "the given image list"
    if not names:
        raise DiftSfmError(f"No images found in {source} "
                           f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return check_image_names(names, source)


def check_image_names(names: Iterable[str], source: str = "the image list") -> list[str]:
    """Refuse names that would collide in an hloc matches.h5 or a COLMAP database.

    Collisions are: the same name twice; names equal up to letter case (``a.jpg`` / ``a.JPG``:
    one file on macOS and Windows); names that differ only by '/' vs '-' (``a/b.jpg`` /
    ``a-b.jpg``: one hloc pair key). Raises DiftSfmError naming both. Returns ``names``.
    """
    from .formats.matches import key_name  # the hloc pair-key rule

    names = list(names)
    for label, norm in (("twice", lambda n: n),
                        ("differing only in letter case", str.casefold),
                        ("differing only by '/' vs '-', one hloc matches.h5 key", key_name)):
        seen: dict[str, str] = {}
        for name in names:
            key = norm(name)
            if key in seen:
                other = seen[key]
                what = f"'{name}'" if other == name else f"'{other}' and '{name}'"
                raise DiftSfmError(f"Duplicate image names in {source}: {what} ({label}). "
                                   "Rename one of them.")
            seen[key] = name
    return names


def read_image(path: Path | str, grayscale: bool = False) -> np.ndarray:
    """Read an image as float32 in [0, 1]: (H, W, 3) RGB, or (H, W) if ``grayscale``.

    Handles 8- and 16-bit, grey, RGB and RGBA (alpha dropped) files of any format OpenCV reads,
    ignoring EXIF orientation. Raises ImageReadError naming the file when it is missing,
    unreadable or truncated.
    """
    path = Path(path)
    rgb = decode_image(read_image_bytes(path), path)
    if grayscale:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return rgb


def read_image_bytes(path: Path) -> bytes:
    """The bytes of an image file; ImageReadError naming it when missing or unreadable."""
    if not path.is_file():
        raise ImageReadError(f"Image {path} does not exist.")
    try:
        return path.read_bytes()
    except (OSError, MemoryError) as err:
        raise ImageReadError(f"Could not read image {path}: {err}") from err


def decode_image(data: bytes | np.ndarray, path: Path | str) -> np.ndarray:
    """Decode an image file's bytes: (H, W, 3) float32 RGB in [0, 1], EXIF orientation ignored.

    ``path`` names the image in errors (ImageReadError). ``read_image`` is this on a file's
    bytes; workers that receive bytes (no shared filesystem) call it directly.
    """
    buffer = (np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray))
              else np.asarray(data, np.uint8))
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(buffer, flags) if buffer.size else None
    except (cv2.error, OSError, MemoryError) as err:
        raise ImageReadError(f"Could not read image {path}: {err}") from err
    if image is None:
        raise ImageReadError(f"Could not decode image {path}: unreadable, truncated or not an "
                             "image.")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageReadError(f"Image {path} is too large ({image.shape[1]}x{image.shape[0]}).")
    if image.dtype == np.uint16:
        image = image.astype(np.float32) / 65535.0
    elif image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    else:
        image = image.astype(np.float32)
        if image.max() > 1.0:
            image /= image.max()
    if image.ndim == 2:
        image = image[..., None]
    channels = image.shape[2]
    if channels == 1:
        rgb = np.repeat(image, 3, axis=2)
    elif channels in (3, 4):
        rgb = image[..., 2::-1]  # BGR(A) -> RGB, alpha dropped
    else:
        raise ImageReadError(f"Image {path} has {channels} channels; expected 1, 3 or 4.")
    return np.ascontiguousarray(rgb)


def resize_max(image: np.ndarray, max_size: int | None) -> tuple[np.ndarray, tuple[float, float]]:
    """Downscale so the longer side is at most ``max_size`` (never upscales).

    Returns the image and the scale (sx, sy) = original size / new size, so a keypoint at
    ``x`` in the resized image sits at ``(x + 0.5) * sx - 0.5`` in the original
    (pixel centres at integer coordinates).
    """
    h, w = image.shape[:2]
    if not max_size or max(h, w) <= max_size:
        return image, (1.0, 1.0)
    ratio = max_size / max(h, w)
    nw, nh = max(1, round(w * ratio)), max(1, round(h * ratio))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    return resized, (w / nw, h / nh)
