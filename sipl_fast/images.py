"""Image files in and out, at their full bit depth, for the command line.

OpenCV decodes and encodes (8- and 16-bit PNG, JPEG, TIFF, WebP, BMP; gray,
RGB, RGBA); Pillow reads the EXIF orientation, which is applied so the image
is restored the way it is shown. Pixels travel as float32 (H, W, C) in [0, 1],
RGB order; alpha travels separately and is written back unchanged. Writes go to
a temporary file that is renamed into place, so no half-written output exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from ._files import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
EIGHT_BIT_ONLY = (".jpg", ".jpeg", ".webp", ".bmp")
NO_ALPHA = (".jpg", ".jpeg", ".bmp")
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class ImageError(ValueError):
    """A file that cannot be read or written as an image."""


@dataclass
class Image:
    """``pixels``: float32 (H, W, 1 or 3) in [0, 1]; ``alpha``: float32 (H, W) or None."""

    pixels: np.ndarray
    alpha: Optional[np.ndarray]
    bit_depth: int  # 8, 16 or 32 (float TIFF)


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def exif_orientation(path: Path) -> int:
    """The EXIF orientation tag (1-8) of ``path``; 1 when absent or unreadable."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            value = int(im.getexif().get(0x0112, 1))
    except Exception:  # no EXIF, or a format Pillow does not know: nothing to rotate
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels (H, W, ...) into displayed pixels for an EXIF orientation."""
    ops = {
        1: lambda t: t,
        2: lambda t: t[:, ::-1],
        3: lambda t: t[::-1, ::-1],
        4: lambda t: t[::-1],
        5: lambda t: t.swapaxes(0, 1),
        6: lambda t: np.rot90(t, -1),
        7: lambda t: np.rot90(t, 2).swapaxes(0, 1),
        8: lambda t: np.rot90(t, 1),
    }
    return np.ascontiguousarray(ops[orientation](a))


def read_image(path) -> Image:
    """Decode ``path`` (EXIF orientation applied); raises ImageError naming the file."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    a = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if a is None:
        raise ImageError(f"{path}: not a readable image")
    if a.dtype in _SCALE:
        depth, a = (8 if a.dtype == np.uint8 else 16), a.astype(np.float32) / _SCALE[a.dtype]
    elif a.dtype == np.float32:
        depth = 32
    else:
        raise ImageError(f"{path}: unsupported sample type {a.dtype} (expected 8/16-bit integers or float32)")
    if a.ndim == 2:
        a = a[..., None]
    alpha = None
    if a.shape[2] in (2, 4):  # gray+alpha or BGRA
        a, alpha = a[..., :-1], a[..., -1]
    if a.shape[2] == 3:
        a = a[..., ::-1]  # BGR -> RGB
    orientation = exif_orientation(path)
    a = apply_orientation(a, orientation)
    if alpha is not None:
        alpha = apply_orientation(alpha, orientation)
    return Image(np.ascontiguousarray(a, dtype=np.float32), alpha, depth)


def encode(image: Image, suffix: str) -> bytes:
    """Encode ``image`` for a file ending in ``suffix`` at the best depth that format holds."""
    suffix = suffix.lower()
    a = np.clip(image.pixels, 0.0, 1.0)
    if a.shape[2] == 3:
        a = a[..., ::-1]
    if image.alpha is not None and suffix not in NO_ALPHA:
        a = np.concatenate([a, np.clip(image.alpha, 0.0, 1.0)[..., None]], axis=2)
    depth = 8 if suffix in EIGHT_BIT_ONLY else image.bit_depth
    if depth == 32 and suffix not in (".tif", ".tiff"):
        depth = 16 if suffix == ".png" else 8
    if depth != 32:
        dtype = np.uint8 if depth == 8 else np.uint16
        a = np.round(a * _SCALE[np.dtype(dtype)]).astype(dtype)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix in (".jpg", ".jpeg") else []
    if suffix == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 101]  # lossless
    ok, buf = cv2.imencode(suffix, np.ascontiguousarray(a.squeeze(2) if a.shape[2] == 1 else a), params)
    if not ok:
        raise ImageError(f"cannot encode a {a.shape} {a.dtype} image as {suffix}")
    return buf.tobytes()


def write_image(path, image: Image) -> None:
    """Encode by ``path``'s suffix and write atomically."""
    path = Path(path)
    data = encode(image, path.suffix)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
