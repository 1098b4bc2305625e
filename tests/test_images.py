"""Client images for /score: only PNG/JPEG/WebP, caps checked before pixels are decoded, EXIF
not applied."""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
from PIL import Image

from service.images import ImageInputError, PixelBudget, check, decode, load

LIMITS = {"max_bytes": 8 * 2**20, "max_pixels": 4096 * 4096}


def b64(image: Image.Image, fmt: str, **kwargs) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "ICO", "PPM"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    with pytest.raises(ImageInputError, match="does not decode as PNG/JPEG/WEBP"):
        decode(b64(Image.new("RGB", (16, 16)), fmt), **LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode(fmt):
    assert decode(b64(Image.new("RGB", (16, 16), (9, 9, 9)), fmt), **LIMITS).size == (16, 16)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = b64(Image.new("1", (12_000, 12_000)), "PNG", optimize=True)  # 144 Mpx in a small file
    assert len(bomb) < 1_000_000
    started = time.perf_counter()
    with pytest.raises(ImageInputError, match=r"the limit is 16777216 pixels"):
        decode(bomb, **LIMITS)
    assert time.perf_counter() - started < 1.0  # refused without inflating 144 Mpx


def test_byte_cap_is_checked_before_base64_decoding():
    with pytest.raises(ImageInputError, match="over 1000 bytes"):
        decode("A" * 10_000, max_bytes=1000, max_pixels=LIMITS["max_pixels"])


def test_exif_orientation_is_not_applied():
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = decode(b64(image, "JPEG", exif=exif), **LIMITS)
    assert decoded.size == (40, 20)
    assert not decoded.info.get("exif")


def test_check_reads_no_pixel_and_load_decodes_what_check_passed():
    """check is what may run on the event loop: a 4096² PNG (0.3 s to decode) in milliseconds."""
    text = b64(Image.new("RGB", (4096, 4096), (10, 200, 30)), "PNG")
    started = time.perf_counter()
    checked = check(text, **LIMITS)
    assert time.perf_counter() - started < 0.05
    assert (checked.format, checked.width, checked.height) == ("PNG", 4096, 4096)
    image = load(checked)
    assert image.size == (4096, 4096) and image.getpixel((5, 5)) == (10, 200, 30)


def test_a_file_broken_after_its_header_passes_check_and_fails_load_with_the_reason():
    data = base64.b64decode(b64(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG"))
    checked = check(base64.b64encode(data[: len(data) // 2]).decode(), **LIMITS)
    with pytest.raises(ImageInputError, match="does not decode as PNG/JPEG/WEBP"):
        load(checked)


def test_the_pixel_budget_lets_images_decode_only_while_they_fit():
    budget = PixelBudget(100)
    order, release = [], threading.Event()

    def second_image() -> None:
        with budget.hold(60):
            order.append("second")
            release.wait(5)

    with budget.hold(60):
        second = threading.Thread(target=second_image)
        second.start()
        time.sleep(0.2)
        assert order == [] and budget.used == 60  # 60 + 60 > 100: the second waits
        order.append("first done")
    time.sleep(0.2)
    assert order == ["first done", "second"] and budget.used == 60
    release.set()
    second.join(5)
    assert budget.used == 0
    with PixelBudget(10).hold(10**6):  # larger than the whole budget: decoded alone
        pass
