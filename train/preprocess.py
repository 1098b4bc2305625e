"""Image preprocessing for SDXL training: buckets, resize, crop, flip, micro-conditioning.

SDXL is conditioned on the original size, the crop's top-left corner and the target size
(`time_ids`), so each prepared image carries those six numbers along with its pixels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True, order=True)
class Bucket:
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
    """Bucket sizes of about `resolution`² pixels (NovelAI/kohya style), sides multiples of `step`.

    For each width, the tallest height that keeps the area within resolution² is taken, so every
    bucket uses nearly the full pixel budget; the square is always included.
    """
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or resolution * 2
    area = resolution * resolution
    buckets = {Bucket(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(area // width // step * step, max_side)
        if height < min_side:
            continue
        if max(width / height, height / width) <= max_ratio:
            buckets.add(Bucket(width, height))
            buckets.add(Bucket(height, width))
    return sorted(buckets)


def choose_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's (log scale); ties go to the larger."""
    ratio = math.log(width / height)
    return min(
        buckets, key=lambda b: (abs(math.log(b.width / b.height) - ratio), -b.width * b.height)
    )


@dataclass(frozen=True)
class Prepared:
    pixels: torch.Tensor
    """float32 (3, H, W) in [-1, 1]."""
    time_ids: tuple[int, int, int, int, int, int]
    """(orig_h, orig_w, crop_top, crop_left, target_h, target_w), as SDXL expects."""


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode: transparency over white, palettes, grey, CMYK, 16-bit."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        array = array / max(array.max(), 1.0) * 255.0
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def prepare_image(
    image: Image.Image,
    bucket: Bucket,
    *,
    crop: str = "center",
    flip: bool = False,
    rng: random.Random | None = None,
) -> Prepared:
    """Resize `image` to cover `bucket`, crop to it (center or random), optionally mirror it."""
    image = to_rgb(image)  # EXIF orientation is ignored: the pixels are taken as stored
    orig_w, orig_h = image.size
    scale = max(bucket.width / orig_w, bucket.height / orig_h)
    new_w = max(bucket.width, round(orig_w * scale))
    new_h = max(bucket.height, round(orig_h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if crop == "center":
        top, left = (new_h - bucket.height) // 2, (new_w - bucket.width) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        top, left = rng.randint(0, new_h - bucket.height), rng.randint(0, new_w - bucket.width)
    else:
        raise ValueError(f"crop {crop!r} is not 'center' or 'random'")
    image = image.crop((left, top, left + bucket.width, top + bucket.height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # The crop's corner as seen in the mirrored image.
        left = new_w - left - bucket.width
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return Prepared(pixels, (orig_h, orig_w, top, left, bucket.height, bucket.width))
