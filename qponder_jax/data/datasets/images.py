"""Image files -> 8-bit RGB, encoded bytes for storage, and back.

Every record stores its image as encoded bytes (PNG or the original JPEG), always 8-bit RGB, so any
reader decodes it the same way with `decode_image`. `to_rgb8` is the one place that handles odd modes:
- grayscale (`L`, `1`) and palette (`P`) images are expanded to RGB with their exact colors;
- alpha (`RGBA`, `LA`, `PA`, palette transparency) is composited over white, as transformers'
  `convert_to_rgb` does, so a transparent pixel never shows the color hidden under it;
- 16-bit images (`I;16*`, or `I` holding values above 255) are scaled by 255/65535 and rounded, never
  clipped; 16-bit RGB PNGs are reduced to 8 bits by Pillow itself (the high byte: a scaling, within 1 of
  the rounded value);
- float (`F`) images in [0, 1] are scaled by 255;
- EXIF orientation is applied (as transformers' `load_image` does).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image file that is missing, unreadable or corrupt; the message names the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """An image ready to be written into a record."""

    data: bytes  # encoded PNG (or the untouched original JPEG/PNG bytes)
    height: int  # of the stored image
    width: int
    orig_height: int  # of the file on disk
    orig_width: int
    resized: bool  # True when the stored image was downscaled at build time


def to_rgb8(image: Image.Image) -> Image.Image:
    """Converts any Pillow image to 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)  # [H, W]
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = "A" in mode or "a" in mode or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes from a record -> an 8-bit RGB PIL image; ValueError saying what is wrong if they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb8(ImageOps.exif_transpose(image))
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise ValueError(pillow_reason(e)) from e


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def pillow_reason(error: Exception) -> str:
    """A Pillow exception as a skip reason, without the in-memory buffer's object address Pillow puts in messages."""
    if isinstance(error, UnidentifiedImageError):
        detail = "no known image format"
    else:
        detail = _BUFFER_REPR.sub("the image bytes", str(error))
    return f"corrupt or unsupported image ({type(error).__name__}: {detail})"


def _is_plain_rgb8(data: bytes, image_format: str | None) -> bool:
    """True when the original bytes already decode to 8-bit RGB without any conversion."""
    if image_format == "JPEG":
        return True
    if image_format == "PNG":
        # IHDR: bit depth at byte 24, color type at byte 25 (2 = truecolor without alpha).
        return len(data) > 25 and data[24] == 8 and data[25] == 2
    return False


def load_image(path: str | os.PathLike, max_short_side: int = 0) -> StoredImage:
    """Reads and validates an image file; converts it to 8-bit RGB and optionally downscales it.

    The original bytes are kept when they already decode to plain 8-bit RGB (JPEG, 8-bit RGB PNG) and
    nothing changed, so JPEG files are not recompressed; everything else is stored as lossless PNG.
    Raises ImageError naming the path if the file is missing or cannot be decoded.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(path, f"cannot read image file ({e})") from e
    try:
        with Image.open(io.BytesIO(data)) as original:
            original.load()
            image_format = original.format
            mode = original.mode
            rotated = _exif_orientation(original) > 1
            image = to_rgb8(ImageOps.exif_transpose(original) if rotated else original)
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageError(path, pillow_reason(e)) from e
    orig_width, orig_height = image.size
    resized = False
    if max_short_side and min(image.size) > max_short_side:
        scale = max_short_side / min(image.size)
        new_size = (max(1, round(orig_width * scale)), max(1, round(orig_height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        resized = True
    if not resized and not rotated and mode == "RGB" and _is_plain_rgb8(data, image_format):
        stored = data
    else:
        stored = encode_png(image)
    return StoredImage(stored, image.height, image.width, orig_height, orig_width, resized)


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1
