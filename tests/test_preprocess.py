"""Buckets, resize-and-crop, flips, and SDXL's micro-conditioning numbers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from train.preprocess import Bucket, choose_bucket, make_buckets, prepare_image


def test_buckets_are_multiples_of_the_step_within_the_pixel_budget():
    buckets = make_buckets(1024, step=64)
    assert Bucket(1024, 1024) in buckets
    assert all(b.width % 64 == 0 and b.height % 64 == 0 for b in buckets)
    assert all(b.width * b.height <= 1024 * 1024 for b in buckets)
    assert all(max(b.width / b.height, b.height / b.width) <= 4.0 for b in buckets)
    assert Bucket(1216, 832) in buckets and Bucket(832, 1216) in buckets  # SDXL's usual 3:2 sizes
    assert buckets == sorted(buckets)


def test_choose_bucket_follows_the_aspect_ratio():
    buckets = make_buckets(1024, step=64)
    wide = choose_bucket(3000, 2000, buckets)
    tall = choose_bucket(2000, 3000, buckets)
    assert wide.width > wide.height and tall.height > tall.width
    assert choose_bucket(500, 500, buckets) == Bucket(1024, 1024)
    assert abs(wide.width / wide.height - 1.5) < 0.1


def test_center_crop_time_ids_for_a_known_case():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    prepared = prepare_image(image, Bucket(64, 64))
    # resized to 128x64 to cover the bucket, then 32 px cut from the left
    assert prepared.time_ids == (100, 200, 0, 32, 64, 64)
    assert prepared.pixels.shape == (3, 64, 64) and prepared.pixels.dtype == torch.float32
    assert torch.allclose(prepared.pixels[0], torch.ones(64, 64))  # red is +1
    assert torch.allclose(prepared.pixels[1], -torch.ones(64, 64))


def test_random_crop_stays_inside_and_needs_an_rng():
    image = Image.new("RGB", (300, 100))
    tops_lefts = {
        prepare_image(image, Bucket(64, 64), crop="random", rng=random.Random(i)).time_ids[2:4]
        for i in range(20)
    }
    assert len(tops_lefts) > 1
    assert all(top == 0 and 0 <= left <= 192 - 64 for top, left in tops_lefts)
    with pytest.raises(ValueError, match="needs an rng"):
        prepare_image(image, Bucket(64, 64), crop="random")


def test_flip_mirrors_the_pixels():
    array = np.zeros((64, 64, 3), dtype=np.uint8)
    array[:, :16] = 255  # white band on the left
    image = Image.fromarray(array)
    plain = prepare_image(image, Bucket(64, 64))
    flipped = prepare_image(image, Bucket(64, 64), flip=True)
    assert torch.equal(flipped.pixels, plain.pixels.flip(-1))
    assert flipped.pixels[:, :, -1].mean() > 0.9 and flipped.pixels[:, :, 0].mean() < -0.9


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_image_mode_becomes_rgb_in_range(mode):
    image = Image.new("RGB", (80, 60), (10, 200, 30)).convert(mode)
    prepared = prepare_image(image, Bucket(64, 64))
    assert prepared.pixels.shape == (3, 64, 64)
    assert prepared.pixels.min() >= -1 and prepared.pixels.max() <= 1


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert torch.allclose(prepare_image(image, Bucket(64, 64)).pixels, torch.ones(3, 64, 64))
