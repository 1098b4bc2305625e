"""Photos as phones and editors write them: EXIF orientation applied before the bucket and the
crop; CMYK, 16-bit, palette and alpha images converted to RGB by the rule `to_rgb` states."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from train.config import TrainConfig
from train.data import Bucket, Example, example_buckets, prepare_image, scan_dataset
from train.evaluate import open_image

# How a camera stores an upright picture U for each EXIF orientation (from the EXIF 2.3 table:
# the tag says how to turn the stored pixels to see U). Written out here, not taken from Pillow.
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # stored turned 90° anticlockwise; shown turned clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_portrait() -> Image.Image:
    """64 wide, 96 tall, a different colour in each third and a marker in one corner: any turn,
    mirror or crop in the wrong place shows in the pixels."""
    array = np.zeros((96, 64, 3), dtype=np.uint8)
    array[:32] = (200, 30, 30)
    array[32:64] = (30, 200, 30)
    array[64:] = (30, 30, 200)
    array[:8, :8] = (255, 255, 0)
    return Image.fromarray(array)


def as_stored(upright: Image.Image, orientation: int, fmt: str = "PNG") -> Image.Image:
    """`upright` as a phone would write it: pixels turned, EXIF orientation tag set."""
    stored = upright if STORED[orientation] is None else upright.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format=fmt, exif=exif, quality=95)
    return Image.open(io.BytesIO(buffer.getvalue()))


def colour_at(pixels: torch.Tensor, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(round((v + 1) * 127.5)) for v in pixels[:, y, x].tolist())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_the_crop(orientation):
    upright = upright_portrait()
    stored = as_stored(upright, orientation)
    if orientation >= 5:
        assert stored.size == (96, 64)  # kept landscape on disk
    got = prepare_image(stored, Bucket(64, 64))
    want = prepare_image(upright, Bucket(64, 64))
    assert torch.equal(got.pixels, want.pixels)
    # SDXL is told the upright size and the crop made on it: 16 rows off the top
    assert got.time_ids == (96, 64, 16, 0, 64, 64)
    assert colour_at(got.pixels, 40, 5) == (200, 30, 30)  # top third, cropped by 16 rows
    assert colour_at(got.pixels, 2, 60) == (30, 30, 200)


def test_jpeg_from_a_phone_is_turned_upright():
    got = prepare_image(as_stored(upright_portrait(), 6, fmt="JPEG"), Bucket(64, 64)).pixels
    assert colour_at(got, 40, 5) == pytest.approx((200, 30, 30), abs=12)
    assert colour_at(got, 40, 60) == pytest.approx((30, 30, 200), abs=12)


def test_buckets_follow_the_upright_shape(tmp_path):
    path = tmp_path / "portrait.png"
    stored = as_stored(upright_portrait(), 6)
    stored.save(path, exif=stored.getexif())
    config = TrainConfig(data_dir="d", name="n", resolution=64, bucketing=True, bucket_step=16)
    [bucket] = example_buckets([Example(path, "x")], config)
    assert bucket.height > bucket.width


def test_evaluation_references_are_turned_upright_too(tmp_path):
    path = tmp_path / "ref.jpg"
    stored = as_stored(upright_portrait(), 8, fmt="JPEG")
    stored.save(path, exif=stored.getexif(), quality=95)
    image = open_image(path)
    assert image.size == (64, 96) and image.mode == "RGB"


def test_scan_reads_photos_with_orientation_tags(tmp_path):
    stored = as_stored(upright_portrait(), 6, fmt="JPEG")
    stored.save(tmp_path / "a.jpg", exif=stored.getexif())
    (tmp_path / "a.txt").write_text("a wound, day 3")
    assert len(scan_dataset(tmp_path).examples) == 1


# --- colour modes, one rule each (to_rgb's docstring)


def one_colour(image: Image.Image) -> tuple[int, int, int]:
    return colour_at(prepare_image(image, Bucket(8, 8)).pixels, 4, 4)


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [
        ((0, 0, 0, 0), (255, 255, 255)),
        ((255, 0, 0, 0), (0, 255, 255)),
        ((0, 0, 0, 255), (0, 0, 0)),
        # R = (255 − C)(255 − K)/255: 155 × 204 / 255 = 124, 205 × 204 / 255 = 164, 204
        ((100, 50, 0, 51), (124, 164, 204)),
    ],
)
def test_cmyk_by_the_stated_formula(cmyk, rgb):
    assert one_colour(Image.new("CMYK", (8, 8), cmyk)) == pytest.approx(rgb, abs=1)


def test_cmyk_jpeg_from_an_editor():
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, format="JPEG", quality=100)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode == "CMYK"
    assert one_colour(image) == pytest.approx((255, 0, 0), abs=3)


def sixteen_bit_rgb_png(values: tuple[int, int, int]) -> Image.Image:
    """An 8×8 PNG of 16 bits per channel (Pillow cannot write one)."""
    row = b"\x00" + struct.pack(">3H", *values) * 8
    raw = row * 8

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return Image.open(io.BytesIO(b"\x89PNG\r\n\x1a\n" + data))


def test_sixteen_bit_colour_keeps_the_high_byte():
    image = sixteen_bit_rgb_png((65535, 128 * 256 + 255, 1000))
    assert one_colour(image) == (255, 128, 3)  # 1000 = 3 × 256 + 232


def test_sixteen_bit_grey_is_scaled():
    array = np.full((8, 8), 1000, dtype=np.uint16)  # 1000 × 255 / 65535 = 3.9 → 4
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    assert one_colour(Image.open(io.BytesIO(buffer.getvalue()))) == (4, 4, 4)


def test_palette_colours_and_transparent_entries():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert one_colour(palette) == (10, 200, 30)
    palette.info["transparency"] = 1
    assert one_colour(palette) == (255, 255, 255)


@pytest.mark.parametrize(
    ("image", "rgb"),
    [
        (Image.new("LA", (8, 8), (0, 128)), (127, 127, 127)),  # black at half alpha over white
        (Image.new("RGBA", (8, 8), (0, 0, 255, 0)), (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (0, 0, 255, 255)), (0, 0, 255)),
    ],
)
def test_alpha_is_composited_over_white(image, rgb):
    assert one_colour(image) == pytest.approx(rgb, abs=1)


def test_rgb_with_a_transparent_colour_is_composited_over_white():
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    image.info["transparency"] = (10, 20, 30)
    assert one_colour(image) == (255, 255, 255)
