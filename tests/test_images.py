"""Image files: EXIF orientation as Pillow shows it, bit depths, alpha, errors."""
import numpy as np
import pytest
from PIL import Image as PILImage, ImageOps

from sipl_fast.images import Image, ImageError, read_image, write_image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    im = PILImage.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    im.save(path, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(PILImage.open(path)))
    np.testing.assert_array_equal(np.round(read_image(path).pixels * 255).astype(np.uint8), expected)


@pytest.mark.parametrize("suffix,depth,alpha", [(".png", 16, True), (".png", 8, False), (".tif", 16, True),
                                                (".webp", 8, True), (".jpg", 8, False), (".bmp", 8, False)])
def test_write_then_read_keeps_depth_and_alpha(tmp_path, suffix, depth, alpha):
    rng = np.random.default_rng(0)
    scale = 2**depth - 1
    smooth = np.linspace(0.1, 0.9, 6 * 7 * 3).reshape(6, 7, 3) + rng.normal(0, 0.01, (6, 7, 3))
    pixels = (np.round(np.clip(smooth, 0, 1) * scale) / scale).astype(np.float32)  # smooth, so JPEG stays close
    a = (rng.integers(0, scale + 1, (6, 7)) / scale).astype(np.float32) if alpha else None
    write_image(tmp_path / f"x{suffix}", Image(pixels, a, depth))
    back = read_image(tmp_path / f"x{suffix}")
    assert back.bit_depth == depth and (back.alpha is not None) == alpha
    tol = 0.05 if suffix == ".jpg" else 1e-6  # JPEG is lossy
    assert np.abs(back.pixels - pixels).mean() < tol
    if alpha:
        np.testing.assert_allclose(back.alpha, a, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [f"x{suffix}"]


def test_jpeg_drops_alpha_and_sixteen_bits(tmp_path):
    write_image(tmp_path / "x.jpg", Image(np.full((4, 4, 3), 0.5, np.float32), np.ones((4, 4), np.float32), 16))
    back = read_image(tmp_path / "x.jpg")
    assert back.bit_depth == 8 and back.alpha is None


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(ImageError, match="broken.png: not a readable image"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(ImageError, match="missing.png: cannot read"):
        read_image(tmp_path / "missing.png")
