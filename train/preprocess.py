"""Image preprocessing for SDXL training: buckets, resize, crop, flip, micro-conditioning.

SDXL is conditioned on the original size, the crop's top-left corner and the target size
(`time_ids`), so each prepared image carries those six numbers along with its pixels; they are
computed as diffusers' `train_text_to_image_lora_sdxl.py` computes them, so an adapter trained here
sees the conditioning the base model was trained with.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CROPS = ("center", "random")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Pillow opens 16-bit greyscale PNGs in these modes; their values run to 65535, not 255."""


@dataclass(frozen=True, order=True)
class Bucket:
    """A training size (pixels); every image in a batch is cropped to the same bucket."""

    width: int
    height: int


def make_buckets(
    resolution: int,
    *,
    step: int = 64,
    min_side: int | None = None,
    max_side: int | None = None,
    max_ratio: float = 4.0,
) -> list[Bucket]:
    """Bucket sizes of about `resolution`² pixels, NovelAI/kohya style, sorted.

    For each width (a multiple of `step` in [min_side, max_side]) the tallest height that is a
    multiple of `step` and keeps the area within resolution² is taken, and its transpose too.
    Smaller buckets of the same shape are left out on purpose: an image would train at a lower
    resolution than the budget allows for no gain. Sides default to resolution/2 .. resolution*2
    (clipped to multiples of `step`); shapes longer than `max_ratio`:1 are dropped; the square
    (resolution, resolution) is always included.
    """
    if resolution <= 0 or step <= 0:
        raise ValueError(f"resolution ({resolution}) and step ({step}) must be positive")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be at least 1, got {max_ratio}")
    low = resolution // 2 if min_side is None else min_side
    high = resolution * 2 if max_side is None else max_side
    low = max(step, math.ceil(low / step) * step)
    high = high // step * step
    if low > high:
        raise ValueError(
            f"no side fits: min_side {min_side} and max_side {max_side} leave no multiple of "
            f"{step} between them"
        )
    area = resolution * resolution
    buckets = {Bucket(resolution, resolution)}
    for width in range(low, high + 1, step):
        height = min(area // width // step * step, high)
        if height >= low and max(width, height) <= max_ratio * min(width, height):
            buckets.add(Bucket(width, height))
            buckets.add(Bucket(height, width))
    return sorted(buckets)


def choose_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's, on a log scale (so 2:1 and 1:2 are
    equally far from square); ties go to the larger bucket, then to the smaller (w, h)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    ratio = math.log(width / height)

    def distance(b: Bucket) -> tuple[float, int, Bucket]:
        # Rounded so that mirror-image buckets tie exactly despite floating-point noise.
        return (round(abs(math.log(b.width / b.height) - ratio), 9), -b.width * b.height, b)

    return min(buckets, key=distance)


@dataclass(frozen=True)
class Prepared:
    """One image ready for the VAE, with the SDXL micro-conditioning that describes it."""

    pixels: torch.Tensor
    """float32 (3, H, W) in [-1, 1], H and W those of the bucket."""
    time_ids: tuple[int, int, int, int, int, int]
    """(orig_h, orig_w, crop_top, crop_left, target_h, target_w), as SDXL expects."""


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB for any mode: transparency over white, palettes, grey, CMYK, 16-bit grey.

    Over white, because transparent pixels usually hold black or garbage that nobody meant to
    show; 16-bit values are scaled to 8 bits rather than clipped (Pillow clips them to white).
    """
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """The size that scales (width, height) to cover `bucket` with one side matching exactly.

    The other side is floored, as torchvision's `Resize` (used by the diffusers scripts) does.
    Integer arithmetic keeps a 3:1 image from becoming 191 pixels wide instead of 192.
    """
    if width * bucket.height >= height * bucket.width:  # wider than the bucket: heights match
        return max(bucket.width, width * bucket.height // height), bucket.height
    return bucket.width, max(bucket.height, height * bucket.width // width)


def prepare_image(
    image: Image.Image,
    bucket: Bucket,
    *,
    crop: str = "center",
    flip: bool = False,
    rng: random.Random | None = None,
) -> Prepared:
    """Resize `image` to cover `bucket` (Lanczos), crop to it, optionally mirror it.

    Center crops are placed as diffusers places them (`round(margin / 2)`); random crops draw
    from `rng`, so a run is repeatable. crop_top/crop_left are in the resized image's pixels. For
    a flip, crop_left is where the crop sits in the mirrored resized image (`new_w - left - w`):
    the geometrically true corner. (The diffusers script computes `w - left` there, which only
    agrees when the resized image is exactly twice the bucket's width.)
    """
    if crop not in CROPS:
        raise ValueError(f"crop {crop!r} is not one of {', '.join(CROPS)}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng (a random.Random) so crops are repeatable")
    image = to_rgb(image)  # EXIF orientation is ignored: the pixels are taken as stored
    orig_w, orig_h = image.size
    new_w, new_h = cover_size(orig_w, orig_h, bucket)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if crop == "center":
        top = int(round((new_h - bucket.height) / 2.0))
        left = int(round((new_w - bucket.width) / 2.0))
    else:
        assert rng is not None
        top = rng.randint(0, new_h - bucket.height)
        left = rng.randint(0, new_w - bucket.width)
    image = image.crop((left, top, left + bucket.width, top + bucket.height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - left - bucket.width
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return Prepared(pixels, (orig_h, orig_w, top, left, bucket.height, bucket.width))
