"""Image bytes in and out of the service: encoding results, and decoding client images safely."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
ALLOWED_INPUT = ("PNG", "JPEG", "WEBP")
"""Decoders reachable from the network: few and common (no TIFF, PSD, EPS…)."""


class ImageInputError(ValueError):
    """A client image is not acceptable; the message says why."""


def encode(image: Image.Image, fmt: str) -> str:
    """Base64 text of `image` in `fmt` (png, jpeg or webp)."""
    buffer = io.BytesIO()
    kwargs = {"quality": 95} if fmt in ("jpeg", "webp") else {}
    image.convert("RGB").save(buffer, format=FORMATS[fmt], **kwargs)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode(text: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode base64 image text, refusing what is too big, not an allowed format, or broken.

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    inflates to gigabytes (a decompression bomb) is refused cheaply. EXIF is not applied.
    """
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise ImageInputError(f"image is over {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("image is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageInputError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_INPUT)
            if image.width * image.height > max_pixels:
                raise ImageInputError(
                    f"image is {image.width}x{image.height}; the limit is {max_pixels} pixels"
                )
            image.load()
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageInputError(
            f"image declares too many pixels (a decompression bomb?); the limit is {max_pixels} "
            f"pixels ({err})"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(
            f"image does not decode as {'/'.join(ALLOWED_INPUT)}: {err}"
        ) from None
    rgb = image.convert("RGB")
    rgb.info = {}  # EXIF, ICC, comments: ignored, and not carried further
    return rgb
