"""Image bytes in and out of the service: encoding results, and decoding client images safely.

Decoding a client image is two steps: `check` (caps and header; cheap, fine on the event loop)
and `load` (the pixels; up to a third of a second of CPU for a 4096² PNG, so in a worker thread,
within a process-wide pixel budget). `decode` does both where it is called, unless the request
being served had its images decoded in advance, off the event loop (`PREDECODED`, filled by
service.predecode): then it returns those."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CheckedImage:
    """A client image whose bytes, format and pixel count passed the caps: cheap to make (no
    pixel decoded), so request validation can make it on the event loop."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def check(text: str, *, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Check base64 image text without decoding a pixel: size, base64, format and the pixel
    count from the header (so a small file that inflates to gigabytes, a decompression bomb, is
    refused cheaply). Milliseconds for the largest allowed image; decode it with `load`."""
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise ImageInputError(f"image is over {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("image is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageInputError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    with _decoding_errors(max_pixels):
        image = _open(data)
        if image.width * image.height > max_pixels:
            raise ImageInputError(
                f"image is {image.width}x{image.height}; the limit is {max_pixels} pixels"
            )
        return CheckedImage(data, image.format, image.width, image.height)


class PixelBudget:
    """How many pixels may be decoding at once, across threads: `load` waits for its image's
    share, so many large images sent together are decoded a few at a time, not all at once. An
    image larger than the whole budget is decoded alone."""

    def __init__(self, pixels: int):
        self.total = pixels
        self.used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.total)
            self.used += pixels
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


DECODE_BUDGET = PixelBudget(2 * 4096 * 4096)
"""The process's budget: two images of the largest default size (BENTOLORA_MAX_INPUT_PIXELS)
decoding at once, about 100 MB of RGB pixels beside what the decoder needs."""


def load(checked: CheckedImage, budget: PixelBudget = DECODE_BUDGET) -> Image.Image:
    """The pixels of an image `check` passed, as RGB without EXIF/ICC/comments, decoded within
    `budget`. Slow for large images (a 4096² PNG takes about 0.3 s of CPU): call it off the event
    loop (in a worker thread, as the API's batch functions run)."""
    with budget.hold(checked.pixels), _decoding_errors(checked.pixels):
        image = _open(checked.data)
        image.load()
        rgb = image.convert("RGB")
    rgb.info = {}  # EXIF, ICC, comments: ignored, and not carried further
    return rgb


PREDECODED: ContextVar[Mapping[tuple[str, int, int], Image.Image | ImageInputError] | None] = (
    ContextVar("bentolora_predecoded_images", default=None)
)
"""The current request's images, decoded in advance off the event loop (service.predecode):
(text, max_bytes, max_pixels) -> the image, or the ImageInputError decoding it raised."""


def decode(text: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """`check` then `load`: decode base64 image text, refusing what is too big, not an allowed
    format, or broken. EXIF is not applied. What the current request had decoded in advance
    (`PREDECODED`) is returned at once; anything else is decoded here, where it is called."""
    ready = PREDECODED.get()
    found = ready.get((text, max_bytes, max_pixels)) if ready else None
    if isinstance(found, ImageInputError):
        raise ImageInputError(str(found))
    if found is not None:
        return found
    return load(check(text, max_bytes=max_bytes, max_pixels=max_pixels))


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=ALLOWED_INPUT)


@contextlib.contextmanager
def _decoding_errors(max_pixels: int) -> Iterator[None]:
    """PIL's errors for broken or hostile files, as ImageInputError with the reason. (No
    `warnings.catch_warnings` here: it changes process-wide state, and decoding runs in several
    threads; the pixel cap, checked from the header, refuses what PIL would only warn about.)"""
    try:
        yield
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
