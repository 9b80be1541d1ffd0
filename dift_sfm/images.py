"""Image discovery, reading and resizing.

Images are read on COLMAP's raw pixel grid: EXIF orientation is ignored, so keypoints written
by dift-sfm line up with what COLMAP and hloc read from the same file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import DiftSfmError, ImageReadError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp",
                    ".tif", ".tiff", ".webp"}

# Above this many decoded pixels an image is refused (about 2 GiB as float32 RGB), whatever
# ``preprocessing.memory_mb`` allows.
MAX_PIXELS = 180_000_000

#: JPEG decode reductions libjpeg does in its DCT (OpenCV's IMREAD_REDUCED_* flags).
JPEG_REDUCTIONS = (1, 2, 4, 8)

#: The ``preprocessing`` conf section at its defaults:
#: - ``resize_max``: longer side (px, or None) of the image both the detector and the
#:   featurizer see;
#: - ``detect_max``: longer side (px, or None) of the image the detector sees, after
#:   ``resize_max`` (hloc's SIFT conf detects at 1600 px, COLMAP at 3200 px); keypoints are
#:   mapped back to original pixels;
#: - ``reduced_decode`` (true; null: off, as in files written before it existed): decode a
#:   JPEG at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling) when every image the conf needs
#:   (the featurizer's input, ``detect_max``, ``resize_max``) still fits in it; resizes then
#:   start from the reduced image;
#: - ``memory_mb``: budget (MiB) of the estimated peak memory to prepare ONE image (decode,
#:   resize, detect); an image over it is refused before it is decoded, with one line naming
#:   it (None: no budget). The preparation pool holds up to ``num_workers`` images at once.
#: - ``min_size`` (shorter side, px) below which an image is refused; ``as_half`` stores
#:   descriptors as float16; ``num_workers``: workers that read, resize and detect ahead of
#:   the featurizer (None: min(8, CPU cores); 0: none), threads or spawned processes
#:   (``worker_type``: 'thread' | 'process').
PREPROCESSING_DEFAULTS = {"resize_max": None, "detect_max": None, "reduced_decode": None,
                          "memory_mb": 4096, "min_size": 16, "as_half": False,
                          "num_workers": None, "worker_type": "thread"}


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding it.

    Attributes:
        size: (W, H) on the raw pixel grid (EXIF orientation ignored, as when decoded).
        channels: samples per pixel in the file (1 grey, 3 colour, 4 with alpha).
        sample_bytes: bytes per sample once decoded (1, or 2 for 16-bit files).
        jpeg: an 8-bit baseline, extended or progressive JPEG, which libjpeg can decode at
            reduced size.
    """

    size: tuple[int, int]
    channels: int = 3
    sample_bytes: int = 1
    jpeg: bool = False


def _jpeg_header(data: bytes) -> ImageHeader | None:
    """Size from a JPEG's first SOFn segment (markers C0-CF except C4, C8, CC)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD9:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 10 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            bits, comps = data[i + 4], data[i + 9]
            # DCT scaling: 8-bit baseline, extended or progressive (not lossless/arithmetic)
            scalable = bits == 8 and marker in (0xC0, 0xC1, 0xC2)
            return ImageHeader((w, h), comps, 2 if bits > 8 else 1, jpeg=scalable)
        i += 2 + length
    return None


def _png_header(data: bytes) -> ImageHeader | None:
    """Size, channels and bit depth from a PNG's IHDR chunk."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour, 4)
    return ImageHeader((w, h), channels, 2 if depth > 8 else 1)


def read_header(data: bytes | np.ndarray) -> ImageHeader | None:
    """The header of an image file's bytes, without decoding: JPEG and PNG are parsed here,
    other formats through Pillow when it is installed (lazy open). None when unknown (the
    caller then decodes and checks the decoded size)."""
    head = bytes(data[:1 << 16]) if isinstance(data, np.ndarray) else data
    if head[:2] == b"\xff\xd8":
        return _jpeg_header(head if len(head) < 1 << 16 else bytes(data))
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_header(head)
    try:
        import io

        from PIL import Image
    except ImportError:
        return None
    try:  # (no warnings filter here: it is process-global and preparation runs in threads)
        with Image.open(io.BytesIO(bytes(data))) as im:
            bands = len(im.getbands())
            deep = im.mode in ("I", "I;16", "I;16B", "F") or "16" in im.mode
            return ImageHeader(tuple(im.size), bands, 2 if deep else 1)
    except Exception:  # noqa: BLE001 - any failure: unknown, the decoder gives the error
        return None


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


def read_image(path: Path | str, grayscale: bool = False, reduce: int = 1) -> np.ndarray:
    """Read an image as float32 in [0, 1]: (H, W, 3) RGB, or (H, W) if ``grayscale``.

    Handles 8- and 16-bit, grey, RGB and RGBA (alpha dropped) files of any format OpenCV reads,
    ignoring EXIF orientation. ``reduce``: see :func:`decode_image`. Raises ImageReadError
    naming the file when it is missing, unreadable or truncated.
    """
    path = Path(path)
    rgb = decode_image(read_image_bytes(path), path, reduce)
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


def decode_raw(data: bytes | np.ndarray, path: Path | str, reduce: int = 1) -> np.ndarray:
    """Decode an image file's bytes as OpenCV gives them: (H, W[, C]) uint8/uint16/float, BGR(A)
    order, EXIF orientation ignored. ``reduce`` 2, 4 or 8 decodes a JPEG at that fraction of
    its size in libjpeg's DCT (8-bit BGR; output pixel i covers original pixels
    [reduce * i, reduce * (i + 1)), so points map with scale ``1 / reduce``); other formats
    ignore it. ImageReadError naming ``path`` when the bytes do not decode."""
    buffer = (np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray))
              else np.asarray(data, np.uint8))
    flags = cv2.IMREAD_UNCHANGED
    if reduce != 1:
        if reduce not in JPEG_REDUCTIONS:
            raise ValueError(f"reduce must be one of {JPEG_REDUCTIONS}, got {reduce}")
        flags = getattr(cv2, f"IMREAD_REDUCED_COLOR_{reduce}")
    try:
        image = cv2.imdecode(buffer, flags | cv2.IMREAD_IGNORE_ORIENTATION) if buffer.size else None
    except (cv2.error, OSError, MemoryError) as err:
        raise ImageReadError(f"Could not read image {path}: {err}") from err
    if image is None:
        raise ImageReadError(f"Could not decode image {path}: unreadable, truncated or not an "
                             "image.")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageReadError(f"Image {path} is too large ({image.shape[1]}x{image.shape[0]}).")
    return image


def decode_image(data: bytes | np.ndarray, path: Path | str, reduce: int = 1) -> np.ndarray:
    """Decode an image file's bytes: (H, W, 3) float32 RGB in [0, 1], EXIF orientation ignored.

    ``path`` names the image in errors (ImageReadError). ``reduce``: a JPEG decoded at
    1/2, 1/4 or 1/8 size (see :func:`decode_raw`). ``read_image`` is this on a file's bytes;
    workers that receive bytes (no shared filesystem) call it directly.
    """
    image = decode_raw(data, path, reduce)
    if image.ndim == 2:
        image = image[..., None]
    channels = image.shape[2]
    if channels not in (1, 3, 4):
        raise ImageReadError(f"Image {path} has {channels} channels; expected 1, 3 or 4.")
    if channels > 1 and image.dtype in (np.uint8, np.uint16):  # exact, before the float copy
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGRA2RGB)
    if image.dtype == np.uint16:
        rgb = image.astype(np.float32)
        np.divide(rgb, np.float32(65535.0), out=rgb)
    elif image.dtype == np.uint8:
        rgb = image.astype(np.float32)
        np.divide(rgb, np.float32(255.0), out=rgb)
    else:
        rgb = image.astype(np.float32)
        if rgb.max() > 1.0:
            rgb /= rgb.max()
        if channels > 1:
            rgb = rgb[..., 2::-1]  # BGR(A) -> RGB, alpha dropped
    del image
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return np.ascontiguousarray(rgb)


def jpeg_reduction(header: ImageHeader | None, needed: tuple[int, int]) -> int:
    """The largest JPEG decode reduction (1, 2, 4, 8) whose image is still at least
    ``needed`` (W, H) in both sides; 1 for files that are not 8-bit JPEGs."""
    if header is None or not header.jpeg:
        return 1
    w, h = header.size
    fits = [f for f in JPEG_REDUCTIONS if -(-w // f) >= needed[0] and -(-h // f) >= needed[1]]
    return max(fits, default=1)


def resized_size(size: tuple[int, int], side: int | None, short: bool = False,
                 upscale: bool = False) -> tuple[int, int]:
    """(W, H) of an image of ``size`` resized so its longer (or, with ``short``, shorter) side
    is ``side`` px, aspect ratio kept (rounded, at least 1). ``side`` None, or a resize that
    would enlarge without ``upscale``, keeps ``size``."""
    w, h = size
    ref = min(w, h) if short else max(w, h)
    if not side or ref == side or (ref < side and not upscale):
        return w, h
    ratio = side / ref
    return max(1, round(w * ratio)), max(1, round(h * ratio))


def resize_image(image: np.ndarray, side: int | None, short: bool = False,
                 upscale: bool = False) -> tuple[np.ndarray, tuple[float, float]]:
    """The one resize: longer (or ``short``-er) side to ``side`` px (see :func:`resized_size`),
    INTER_AREA down, INTER_LINEAR up.

    Returns the image (the same object when its size is kept) and the scale (sx, sy) =
    new size / original size, the convention of
    :func:`~dift_sfm.geometry.scale_pixel_coords`: a point x of the original sits at
    ``(x + 0.5) * sx - 0.5`` in the resized image (pixel centres at integer coordinates);
    ``scale_pixel_coords(xy, 1 / s)`` maps back.
    """
    h, w = image.shape[:2]
    nw, nh = resized_size((w, h), side, short, upscale)
    if (nw, nh) == (w, h):
        return image, (1.0, 1.0)
    interp = cv2.INTER_AREA if nw * nh < w * h else cv2.INTER_LINEAR
    return cv2.resize(image, (nw, nh), interpolation=interp), (nw / w, nh / h)
