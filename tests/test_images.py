import cv2
import numpy as np
import pytest
from conftest import texture
from PIL import Image

from dift_sfm.errors import DiftSfmError, ImageReadError
from dift_sfm.geometry import scale_pixel_coords
from dift_sfm.images import list_images, read_image, resize_max, resolve_image_list


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


def test_resize_max_maps_back_to_original():
    img = np.zeros((300, 400, 3), np.float32)
    small, scale = resize_max(img, 100)
    assert small.shape == (75, 100, 3) and scale == (4.0, 4.0)
    # the centre of the resized image is the centre of the original
    centre = scale_pixel_coords(np.array([[49.5, 37.0]], np.float32), scale)
    assert np.allclose(centre, [[199.5, 149.5]])
    same, s1 = resize_max(img, 1000)
    assert same is img and s1 == (1.0, 1.0)
