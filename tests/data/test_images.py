import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import read_rgb
from pipeline.errors import UserError


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def test_rgb_png_round_trips_exactly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    out = read_rgb(_save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(40, dtype=np.uint8).reshape(5, 8) * 6
    out = read_rgb(_save(Image.fromarray(gray, mode="L"), tmp_path / "g.png"))
    assert out.shape == (5, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_palette_image_uses_palette_colours(tmp_path):
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    out = read_rgb(_save(img, tmp_path / "p.png"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (0, 0, 255)


def test_palette_transparency_is_composited_on_black(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([200, 100, 50, 10, 20, 30] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1
    out = read_rgb(_save(img, tmp_path / "pt.png", transparency=1))
    assert tuple(out[0, 0]) == (200, 100, 50) and tuple(out[0, 1]) == (0, 0, 0)


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    # Pure cyan ink (C=255) is (0, 255, 255) in RGB; JPEG is lossy, so compare loosely.
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    out = read_rgb(_save(img, tmp_path / "c.jpg", quality=95))
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0), [0, 255, 255], atol=6)


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    out = read_rgb(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "t.png"))
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 2], [100, 50, 25])


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")  # PIL keeps the 16-bit data
    out = read_rgb(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_sixteen_bit_tiff_is_scaled(tmp_path):
    values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    out = read_rgb(_save(Image.fromarray(values), tmp_path / "deep.tif"))
    np.testing.assert_array_equal(out[:, :, 1], [[0, 255], [128, 1]])


def test_truncated_jpeg_names_the_file(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UserError, match="cut.jpg"):
        read_rgb(path)


def test_truncated_png_names_the_file(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UserError, match="cut.png"):
        read_rgb(path)


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(UserError, match="notes.png.*corrupt") as info:
        read_rgb(path)
    assert "\n" not in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.png"):
        read_rgb(tmp_path / "nope.png")
