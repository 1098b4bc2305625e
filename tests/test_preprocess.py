"""Buckets, resize-and-crop, flips, colour modes, and SDXL's micro-conditioning numbers."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import Bucket, choose_bucket, cover_size, make_buckets, prepare_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(width: int, height: int) -> Image.Image:
    """Red left half, blue right half: where the crop and flip went is visible in the pixels."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = RED
    array[:, width // 2 :] = BLUE
    return Image.fromarray(array)


def colour_at(pixels: torch.Tensor, x: int, y: int = 0) -> tuple[int, int, int]:
    return tuple(int(round((v + 1) * 127.5)) for v in pixels[:, y, x].tolist())


# --- buckets


@pytest.mark.parametrize(("resolution", "step"), [(1024, 64), (512, 64), (128, 16), (96, 32)])
def test_bucket_properties(resolution, step):
    buckets = make_buckets(resolution, step=step)
    assert Bucket(resolution, resolution) in buckets
    assert buckets == sorted(set(buckets))
    for b in buckets:
        assert b.width % step == 0 and b.height % step == 0
        assert b.width * b.height <= resolution * resolution
        assert max(b.width, b.height) <= 4 * min(b.width, b.height)
        assert resolution // 2 // step * step <= min(b.width, b.height)
        assert max(b.width, b.height) <= resolution * 2
        assert Bucket(b.height, b.width) in buckets  # portrait for every landscape
    assert len(buckets) >= 3


def test_buckets_at_1024_are_sdxls_usual_sizes_and_use_the_pixel_budget():
    buckets = make_buckets(1024)
    for size in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640)]:
        assert Bucket(*size) in buckets and Bucket(*reversed(size)) in buckets
    # Each bucket is the largest for one of its sides: a step more on the other breaks the budget.
    area = 1024 * 1024
    assert all(
        b.width * (b.height + 64) > area or (b.width + 64) * b.height > area for b in buckets
    )
    assert Bucket(768, 768) not in buckets and Bucket(1216, 768) not in buckets


def test_bucket_limits_are_respected_and_clipped_to_the_step():
    buckets = make_buckets(512, step=64, min_side=300, max_side=700, max_ratio=1.5)
    assert Bucket(512, 512) in buckets
    assert all(320 <= min(b.width, b.height) and max(b.width, b.height) <= 640 for b in buckets)
    assert all(max(b.width, b.height) <= 1.5 * min(b.width, b.height) for b in buckets)
    assert make_buckets(512, max_ratio=1.0) == [Bucket(512, 512)]


def test_the_square_is_included_even_off_the_step_grid():
    buckets = make_buckets(100, step=64)
    assert Bucket(100, 100) in buckets
    assert all(b.width % 64 == 0 and b.height % 64 == 0 for b in buckets if b != Bucket(100, 100))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 0}, "must be positive"),
        ({"resolution": 512, "step": 0}, "must be positive"),
        ({"resolution": 512, "max_ratio": 0.5}, "max_ratio must be at least 1"),
        ({"resolution": 512, "min_side": 600, "max_side": 620}, "no side fits"),
    ],
)
def test_bad_bucket_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_buckets(**kwargs)


def test_choose_bucket_follows_the_aspect_ratio():
    buckets = make_buckets(1024)
    wide, tall = choose_bucket(3000, 2000, buckets), choose_bucket(2000, 3000, buckets)
    assert wide.width > wide.height and tall.height > tall.width
    assert wide == Bucket(1216, 832) and tall == Bucket(832, 1216)  # 1.46, the closest to 1.5
    assert choose_bucket(500, 500, buckets) == Bucket(1024, 1024)
    assert choose_bucket(1344, 768, buckets) == Bucket(1344, 768)  # exact shapes map to themselves
    assert choose_bucket(10_000, 100, buckets) == max(buckets, key=lambda b: b.width / b.height)


def test_choose_bucket_ties_go_to_the_larger_area():
    small, large = Bucket(64, 32), Bucket(128, 64)
    assert choose_bucket(200, 100, [small, large]) == large
    assert choose_bucket(200, 100, [large, small]) == large
    # 2:1 and 1:2 are equally far from a square image; the choice does not depend on the order.
    assert choose_bucket(50, 50, [Bucket(128, 64), Bucket(64, 128)]) == Bucket(64, 128)
    assert choose_bucket(50, 50, [Bucket(64, 128), Bucket(128, 64)]) == Bucket(64, 128)


def test_choose_bucket_refuses_nonsense():
    with pytest.raises(ValueError, match="no buckets"):
        choose_bucket(10, 10, [])
    with pytest.raises(ValueError, match="must be positive, got 0x10"):
        choose_bucket(0, 10, [Bucket(64, 64)])


# --- resize and crop


def test_center_crop_time_ids_for_a_known_case():
    prepared = prepare_image(halves(200, 100), Bucket(64, 64))
    # resized to 128x64 to cover the bucket, then 32 px cut from the left (and the right)
    assert prepared.time_ids == (100, 200, 0, 32, 64, 64)
    assert all(isinstance(v, int) for v in prepared.time_ids)
    assert prepared.pixels.shape == (3, 64, 64) and prepared.pixels.dtype == torch.float32
    assert colour_at(prepared.pixels, 0) == RED and colour_at(prepared.pixels, 63) == BLUE
    assert colour_at(prepared.pixels, 28) == RED and colour_at(prepared.pixels, 36) == BLUE


def test_portrait_images_are_cropped_top_and_bottom():
    prepared = prepare_image(Image.new("RGB", (100, 300)), Bucket(64, 64))
    assert prepared.time_ids == (300, 100, 64, 0, 64, 64)  # 64x192, 64 cut from the top


def test_image_of_the_buckets_shape_is_only_resized():
    prepared = prepare_image(halves(200, 100), Bucket(128, 64))
    assert prepared.time_ids == (100, 200, 0, 0, 64, 128)
    assert prepared.pixels.shape == (3, 64, 128)


@pytest.mark.parametrize(("width", "left"), [(131, 34), (129, 32), (130, 33)])
def test_center_crop_rounds_like_diffusers(width, left):
    # diffusers: x1 = max(0, int(round((image.width - args.resolution) / 2.0))), banker's rounding
    prepared = prepare_image(Image.new("RGB", (width, 64)), Bucket(64, 64))
    assert prepared.time_ids[3] == left == int(round((width - 64) / 2.0))


def test_cover_size_is_exact_integer_arithmetic():
    assert cover_size(300, 100, Bucket(64, 64)) == (192, 64)
    assert cover_size(100, 300, Bucket(64, 64)) == (64, 192)
    assert cover_size(1000, 999, Bucket(64, 64)) == (64, 64)  # floored, never below the bucket
    assert cover_size(3000, 2000, Bucket(1216, 832)) == (1248, 832)


def test_random_crop_stays_inside_is_repeatable_and_needs_an_rng():
    image = Image.new("RGB", (300, 100))
    corners = {
        prepare_image(image, Bucket(64, 64), crop="random", rng=random.Random(i)).time_ids[2:4]
        for i in range(30)
    }
    assert len(corners) > 5
    assert all(top == 0 and 0 <= left <= 192 - 64 for top, left in corners)
    again = [
        prepare_image(image, Bucket(64, 64), crop="random", rng=random.Random(7)) for _ in "ab"
    ]
    assert again[0].time_ids == again[1].time_ids
    with pytest.raises(ValueError, match="needs an rng"):
        prepare_image(image, Bucket(64, 64), crop="random")
    with pytest.raises(ValueError, match="crop 'middle' is not one of center, random"):
        prepare_image(image, Bucket(64, 64), crop="middle")


def test_flip_mirrors_the_pixels_and_the_crop_corner():
    image = halves(300, 100)  # resized to 192x64
    plain = prepare_image(image, Bucket(64, 64), crop="random", rng=random.Random(3))
    flipped = prepare_image(image, Bucket(64, 64), crop="random", rng=random.Random(3), flip=True)
    assert torch.equal(flipped.pixels, plain.pixels.flip(-1))
    left = plain.time_ids[3]
    assert flipped.time_ids == (*plain.time_ids[:3], 192 - left - 64, 64, 64)

    centred = prepare_image(halves(64, 64), Bucket(64, 64), flip=True)
    assert colour_at(centred.pixels, 0) == BLUE and colour_at(centred.pixels, 63) == RED


# --- colour modes


def sixteen_bit_png(values: list[int]) -> Image.Image:
    array = np.array([values] * 4, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA", "CMYK", "1", "I", "I;16", "F"])
def test_any_image_mode_becomes_rgb_in_range(mode):
    image = Image.new("RGB", (80, 60), (10, 200, 30)).convert(mode)
    prepared = prepare_image(image, Bucket(64, 64))
    assert prepared.pixels.shape == (3, 64, 64) and prepared.pixels.dtype == torch.float32
    assert prepared.pixels.min() >= -1 and prepared.pixels.max() <= 1
    assert torch.isfinite(prepared.pixels).all()


def test_colours_survive_conversion():
    palette = Image.new("RGB", (64, 64), (10, 200, 30)).quantize(4)
    green = prepare_image(palette, Bucket(64, 64))
    assert colour_at(green.pixels, 5, 5) == (10, 200, 30)
    grey = prepare_image(Image.new("L", (64, 64), 51), Bucket(64, 64))
    assert colour_at(grey.pixels, 5, 5) == (51, 51, 51)


def test_transparency_is_composited_over_white():
    clear = prepare_image(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), Bucket(64, 64))
    assert torch.allclose(clear.pixels, torch.ones(3, 64, 64))
    half = prepare_image(Image.new("RGBA", (64, 64), (255, 0, 0, 128)), Bucket(64, 64))
    assert colour_at(half.pixels, 5, 5) == (255, 127, 127)
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert torch.allclose(prepare_image(palette, Bucket(64, 64)).pixels, torch.ones(3, 64, 64))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    image = sixteen_bit_png([0] * 16 + [128 * 257] * 16 + [65535] * 32)
    assert image.mode.startswith("I")
    pixels = prepare_image(image, Bucket(64, 4)).pixels
    assert colour_at(pixels, 0) == (0, 0, 0)
    assert colour_at(pixels, 20) == (128, 128, 128)
    assert colour_at(pixels, 60) == (255, 255, 255)
