import cv2
import numpy as np
import pytest
from conftest import texture
from PIL import Image

from dift_sfm.errors import DiftSfmError, ImageReadError
from dift_sfm.geometry import scale_pixel_coords
from dift_sfm.images import (
    decode_image,
    jpeg_reduction,
    list_images,
    read_header,
    read_image,
    resize_image,
    resized_size,
    resolve_image_list,
)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".ppm", ".tif", ".bmp"])
def test_read_formats_rgb(tmp_path, ext):
    img = texture(40, 60, seed=3)  # RGB
    path = tmp_path / f"x{ext}"
    cv2.imwrite(str(path), img[..., ::-1])
    out = read_image(path)
    assert out.shape == (40, 60, 3) and out.dtype == np.float32
    tol = 0.2 if ext == ".jpg" else 1e-6
    assert np.abs(out - img / 255.0).mean() < tol


def test_read_grey_rgba_16bit(tmp_path):
    grey = texture(30, 50)[..., 0]
    cv2.imwrite(str(tmp_path / "g.pgm"), grey)
    out = read_image(tmp_path / "g.pgm")
    assert out.shape == (30, 50, 3) and np.allclose(out[..., 0], grey / 255.0)
    assert np.allclose(out[..., 0], out[..., 2])

    rgba = np.dstack([texture(30, 50), np.full((30, 50), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (30, 50, 3) and np.allclose(out, rgba[..., :3] / 255.0)

    deep = (np.arange(30 * 50, dtype=np.uint16).reshape(30, 50) * 40)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    out = read_image(tmp_path / "d.png", grayscale=True)
    assert out.shape == (30, 50) and np.allclose(out, deep / 65535.0, atol=1e-6)


def test_exif_orientation_ignored(tmp_path):
    img = texture(40, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    Image.fromarray(img).save(tmp_path / "r.jpg", exif=exif, quality=98)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (40, 80, 3)  # COLMAP's raw grid, not the displayed one


def test_bad_images(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="junk.jpg"):
        read_image(tmp_path / "junk.jpg")
    cv2.imwrite(str(tmp_path / "t.png"), texture(64, 64))
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="trunc.png"):
        read_image(tmp_path / "trunc.png")


def test_list_and_resolve(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.JPG", "a.png", "sub/c.jpeg"]:
        cv2.imwrite(str(tmp_path / name), texture(20, 20))
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".hidden.png").write_bytes(b"")
    assert list_images(tmp_path) == ["a.png", "b.JPG", "sub/c.jpeg"]
    (tmp_path / "list.txt").write_text("a.png\n\n# comment\nsub/c.jpeg 1 2 3\n")
    assert resolve_image_list(tmp_path, tmp_path / "list.txt") == ["a.png", "sub/c.jpeg"]
    with pytest.raises(DiftSfmError, match="Duplicate"):
        resolve_image_list(tmp_path, ["a.png", "a.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiftSfmError, match="No images"):
        resolve_image_list(tmp_path / "empty", None)
    with pytest.raises(DiftSfmError, match="does not exist"):
        list_images(tmp_path / "nope")


def test_resize_image_one_convention():
    """Longer or shorter side, down or up: the scale is new / original, the one that
    scale_pixel_coords takes, and 1 / scale maps back."""
    img = np.zeros((300, 400, 3), np.float32)
    small, scale = resize_image(img, 100)
    assert small.shape == (75, 100, 3) and scale == (0.25, 0.25)
    # the centre of the original is the centre of the resized image, and back
    centre = scale_pixel_coords(np.array([[199.5, 149.5]], np.float32), scale)
    assert np.allclose(centre, [[49.5, 37.0]])
    assert np.allclose(scale_pixel_coords(centre, 1 / np.asarray(scale)), [[199.5, 149.5]])
    same, s1 = resize_image(img, 1000)
    assert same is img and s1 == (1.0, 1.0)
    short, s2 = resize_image(img, 150, short=True)
    assert short.shape == (150, 200, 3) and s2 == (0.5, 0.5)
    big, s3 = resize_image(img, 600, short=True, upscale=True)
    assert big.shape == (600, 800, 3) and s3 == (2.0, 2.0)
    assert resize_image(img, 600, short=True)[0] is img  # no upscale unless asked
    assert resized_size((400, 300), 100) == (100, 75)
    assert resized_size((400, 300), None) == (400, 300)


@pytest.mark.parametrize("ext,shape,dtype", [
    (".jpg", (37, 53, 3), np.uint8), (".jpg", (40, 24), np.uint8),
    (".png", (33, 41, 4), np.uint8), (".png", (20, 30), np.uint16),
    (".png", (20, 30, 3), np.uint16), (".tif", (21, 17, 3), np.uint8),
    (".bmp", (12, 19, 3), np.uint8), (".ppm", (16, 18, 3), np.uint8),
    (".webp", (16, 20, 3), np.uint8)])
def test_header_gives_the_decoded_size(tmp_path, ext, shape, dtype):
    """The header (read without decoding) says what decoding gives; unknown bytes: None."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    path = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(path), img)
    header = read_header(path.read_bytes())
    assert header is not None and header.size == (shape[1], shape[0])
    assert header.jpeg == (ext == ".jpg")
    assert read_image(path).shape[:2] == shape[:2]
    assert read_header(b"not an image at all") is None


def test_decode_is_the_landed_decode(tmp_path):
    """decode_image converts channels before the float copy: the same values as before."""
    rng = np.random.default_rng(1)
    for shape, dtype, ext in [((30, 40, 3), np.uint8, ".png"), ((30, 40, 4), np.uint8, ".png"),
                              ((30, 40, 3), np.uint16, ".png"), ((30, 40), np.uint8, ".png"),
                              ((30, 40, 3), np.uint8, ".jpg")]:
        img = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
        path = tmp_path / f"d{ext}"
        cv2.imwrite(str(path), img)
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
        ref = raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
        ref = np.repeat(ref[..., None], 3, 2) if ref.ndim == 2 else ref[..., 2::-1]
        got = decode_image(path.read_bytes(), path)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert np.array_equal(got, ref)


def _blobs(w: int, h: int, centres: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w), np.float32)
    for x, y in centres:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 6.0 ** 2))
    return np.clip(img * 255, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("reduce", [2, 4, 8])
def test_reduced_jpeg_decode_maps_with_one_over_reduce(tmp_path, reduce):
    """A JPEG decoded at 1/r (sides not multiples of r): original point x sits at
    (x + 0.5) / r - 0.5, whatever the rounding of the decoded size."""
    w, h = 403, 301
    centres = np.array([[60.0, 50.0], [340.3, 70.0], [200.0, 150.5], [80.0, 250.0],
                        [350.0, 260.0]], np.float32)
    path = tmp_path / "b.jpg"
    cv2.imwrite(str(path), _blobs(w, h, centres), [cv2.IMWRITE_JPEG_QUALITY, 100])
    small = decode_image(path.read_bytes(), path, reduce)
    assert small.shape[:2] == (-(-h // reduce), -(-w // reduce))
    gray = small.mean(2)
    want = scale_pixel_coords(centres, (1 / reduce, 1 / reduce))
    for x, y in want:  # intensity-weighted centroid in a window around the expected place
        r = max(2, int(12 / reduce))
        x0, y0 = int(round(x)) - r, int(round(y)) - r
        win = gray[y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1]
        win = np.clip(win - win.min(), 0, None)
        gy, gx = np.mgrid[0:win.shape[0], 0:win.shape[1]]
        cx, cy = (gx * win).sum() / win.sum() + x0, (gy * win).sum() / win.sum() + y0
        assert abs(cx - x) * reduce < 0.6 and abs(cy - y) * reduce < 0.6, (reduce, x, y, cx, cy)


def test_jpeg_reduction_keeps_what_is_needed(tmp_path):
    path = tmp_path / "r.jpg"
    cv2.imwrite(str(path), np.zeros((3024, 4032, 3), np.uint8))
    header = read_header(path.read_bytes())
    assert jpeg_reduction(header, (1600, 768)) == 2
    assert jpeg_reduction(header, (768, 768)) == 2  # 1008x756 would upscale 756 -> 768
    assert jpeg_reduction(header, (500, 375)) == 8
    assert jpeg_reduction(header, (4032, 3024)) == 1
    png = tmp_path / "r.png"
    cv2.imwrite(str(png), np.zeros((3024, 4032, 3), np.uint8))
    assert jpeg_reduction(read_header(png.read_bytes()), (500, 375)) == 1
