"""Read any image file as an RGB uint8 array, turning every decoding failure into a UserError that names the file.

Mode handling, so that every loader in the project sees the same pixels:
- grayscale (1, L), palette (P), CMYK, YCbCr, LAB, HSV: converted by PIL to RGB.
- transparency (RGBA, LA, PA, P with a transparent colour): composited on black, i.e. RGB multiplied by alpha.
  Dropping alpha instead would expose whatever colour the writer left under fully transparent pixels, which
  differs between tools; compositing makes invisible pixels the same (black) everywhere.
- 16-bit grayscale (I;16, I;16B, I;16L): scaled by 255/65535, so the full 16-bit range maps onto 0..255.
  PIL's own convert("L") clips everything above 255 to white.
- 32-bit integer (I): PIL also stores 16-bit PNG/TIFF data this way, so values up to 65535 are scaled like
  16-bit; values that already fit 0..255 are kept; anything else (negative, > 65535) is min-max stretched.
- float (F): values within 0..1 are scaled by 255, values within 0..255 are kept, anything else is min-max stretched.
EXIF orientation is not applied (same as torchvision and timm loaders), so pixel coordinates match annotations
made on the stored pixels.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError

# PIL signals a broken file with any of these, depending on the format plugin and where the data ends.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


# File types every dataset adapter and `pipeline predict` pick up (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class NotAnImage(ValueError):
    """Bytes that do not decode as an image; the message is the decoder's reason, one line."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode `path` fully and return its pixels as an (H, W, 3) uint8 array."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image file '{path}' does not exist or is not a file; check the dataset folder")
    try:
        return _decode(path)
    except NotAnImage as err:
        raise UserError(
            f"image file '{path}' is corrupt, truncated or not an image ({err}); "
            "replace or delete it, or set data.skip_bad_images: true to skip unreadable files"
        ) from err


def decode_rgb(data: bytes) -> np.ndarray:
    """`read_rgb` for an image file held in memory (a served request's image); raises `NotAnImage`."""
    return _decode(io.BytesIO(data))


def _decode(source: Path | io.BytesIO) -> np.ndarray:
    try:
        with Image.open(source) as img:
            # load() decodes every byte now: a truncated file fails here rather than yielding a grey bottom half.
            img.load()
            return to_rgb_array(img)
    except UnidentifiedImageError as err:  # its message names the source, `<_io.BytesIO object at 0x...>` for bytes
        raise NotAnImage("no known image format") from err
    except _DECODE_ERRORS as err:
        raise NotAnImage(str(err).splitlines()[0] if str(err) else type(err).__name__) from err


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to an (H, W, 3) uint8 array (rules in the module docstring)."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        gray = _high_depth_to_uint8(np.asarray(img), img.mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        return _composite_on_black(np.asarray(img))
    if img.mode != "RGB":
        img = img.convert("RGB")
    # np.array copies: np.asarray of a PIL image is read-only, which torch.from_numpy warns about.
    return np.array(img, dtype=np.uint8)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[:, :, :3].astype(np.uint16)
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    # (x * a + 127) // 255 rounds to nearest, so opaque pixels keep their exact value.
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES:
        scaled = values * (255.0 / 65535.0)
    elif mode == "I":
        scaled = _scale_by_range(values, candidates=(255.0, 65535.0))
    else:
        scaled = _scale_by_range(values, candidates=(1.0, 255.0))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _scale_by_range(values: np.ndarray, candidates: tuple[float, ...]) -> np.ndarray:
    """Scale by the smallest nominal range (e.g. 0..1, 0..255, 0..65535) that holds every value, else min-max."""
    low, high = float(values.min()), float(values.max())
    for top in candidates:
        if low >= 0.0 and high <= top:
            return values * (255.0 / top)
    if high == low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def inside(root: Path, file_name: str) -> Path | None:
    """`root / file_name`, or None when the name leads outside `root` (an absolute path, `..`, a link out): a file
    name read from an annotation file must not reach other files."""
    path = root / file_name
    return path if path.resolve().is_relative_to(root.resolve()) else None
