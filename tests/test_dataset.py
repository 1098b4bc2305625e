"""Dataset discovery in three layouts, and every way a dataset can be wrong."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from train.data import IMAGE_SUFFIXES, DatasetError, DatasetScan, scan_dataset
from train.sample_data import write_sample_dataset


@pytest.fixture
def captions(tmp_path: Path) -> Path:
    return write_sample_dataset(tmp_path / "captions", count=6, layout="captions")


def relative(scan: DatasetScan) -> list[tuple[str, str]]:
    return [(e.path.relative_to(scan.root).as_posix(), e.caption) for e in scan.examples]


def write_jsonl(root: Path, *records: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A one-pixel PNG whose header claims `width`x`height`: a decompression bomb in 70 bytes."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type and data
    return bytes(data)


# --- layouts


def test_three_layouts_scan_to_the_same_examples(tmp_path):
    scans = {
        layout: scan_dataset(write_sample_dataset(tmp_path / layout, count=6, layout=layout))
        for layout in ("captions", "jsonl", "csv")
    }
    assert {layout: s.layout for layout, s in scans.items()} == {
        "captions": "captions",
        "jsonl": "jsonl",
        "csv": "csv",
    }
    pairs = [relative(scan) for scan in scans.values()]
    assert pairs[0] == pairs[1] == pairs[2]
    assert [p for p, _ in pairs[0]] == [f"{i:04d}.png" for i in range(6)]
    assert all(caption.endswith("background") for _, caption in pairs[0])
    assert all(not s.skipped for s in scans.values())
    assert len({s.fingerprint() for s in scans.values()}) == 1  # same pixels, same captions


def test_captions_layout_is_recursive_sorted_and_takes_every_suffix(tmp_path):
    root = tmp_path / "data"
    names = ["z.png", "b/deep/a.JPG", "a.jpeg", "b/c.webp", "B.bmp", "m.PNG"]
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
        Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format=fmt)
        path.with_suffix(".txt").write_text(f"caption of {name}")
    scan = scan_dataset(root)
    assert [p for p, _ in relative(scan)] == sorted(names)
    assert {s.lower() for s in {Path(n).suffix for n in names}} == set(IMAGE_SUFFIXES)
    assert dict(relative(scan))["b/deep/a.JPG"] == "caption of b/deep/a.JPG"


def test_captions_are_cleaned_of_byte_order_marks_and_whitespace(captions):
    (captions / "0000.txt").write_bytes("\ufeffa red\n  circle \r\n\n".encode())
    assert scan_dataset(captions).examples[0].caption == "a red circle"


def test_hidden_files_and_folders_are_ignored(captions):
    for name in [".ipynb_checkpoints/0000.png", "__MACOSX/0001.png", ".hidden.png"]:
        (captions / name).parent.mkdir(exist_ok=True)
        shutil.copy(captions / "0000.png", captions / name)
        (captions / name).with_suffix(".txt").write_text("copy")
    (captions / "._0002.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    scan = scan_dataset(captions)
    assert len(scan.examples) == 6 and not scan.skipped


def test_custom_columns_in_csv(tmp_path):
    root = write_sample_dataset(tmp_path / "c", count=2, layout="csv")
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "extra"])
        writer.writerow(["0001.png", "one", "x"])
        writer.writerow(["0000.png", "zero", "y"])
    scan = scan_dataset(root, image_column="image", caption_column="caption")
    assert relative(scan) == [("0000.png", "zero"), ("0001.png", "one")]


def test_csv_from_a_spreadsheet_with_byte_order_mark(tmp_path):
    root = write_sample_dataset(tmp_path / "c", count=2, layout="csv")
    text = (root / "metadata.csv").read_text()
    (root / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert len(scan_dataset(root).examples) == 2


def test_metadata_layout_leaves_unlisted_images_out_and_says_so(tmp_path, caplog):
    root = write_sample_dataset(tmp_path / "j", count=3, layout="jsonl")
    shutil.copy(root / "0000.png", root / "forgotten.png")
    with caplog.at_level(logging.INFO, logger="train.data"):
        scan = scan_dataset(root)
    assert len(scan.examples) == 3
    assert "1 images in" in caplog.text and "not named in metadata.jsonl" in caplog.text


# --- single bad images: skipped, counted, logged


def test_undecodable_and_truncated_images_are_skipped_counted_and_logged(captions, caplog):
    (captions / "garbage.png").write_bytes(b"\x89PNG but not really")
    (captions / "garbage.txt").write_text("garbage")
    data = (captions / "0001.png").read_bytes()
    (captions / "truncated.png").write_bytes(data[: len(data) // 2])
    (captions / "truncated.txt").write_text("truncated")
    with caplog.at_level(logging.WARNING, logger="train.data"):
        scan = scan_dataset(captions)
    assert len(scan.examples) == 6
    skipped = {s.path.name: s.reason for s in scan.skipped}
    assert set(skipped) == {"garbage.png", "truncated.png"}
    assert all(r.startswith("does not decode: ") for r in skipped.values())
    summary = scan.summary()
    assert summary["skipped"] == 2 and summary["skipped_reasons"] == {"does not decode": 2}
    assert "garbage.png" in caplog.text and "truncated.png" in caplog.text


def test_images_without_captions_are_skipped_and_counted(captions):
    (captions / "0002.txt").unlink()
    (captions / "0003.txt").write_text("   \n")
    scan = scan_dataset(captions)
    assert len(scan.examples) == 4
    assert {s.path.name: s.reason for s in scan.skipped} == {
        "0002.png": "no caption (0002.txt missing or empty)",
        "0003.png": "no caption (0003.txt missing or empty)",
    }
    assert scan.summary()["skipped_reasons"] == {"no caption": 2}


def test_metadata_rows_with_missing_files_or_empty_captions_are_skipped(tmp_path):
    root = write_jsonl(
        write_sample_dataset(tmp_path / "j", count=3, layout="jsonl"),
        {"file_name": "0000.png", "text": "zero"},
        {"file_name": "0001.png", "text": " "},
        {"file_name": "0002.png", "text": None},
        {"file_name": "ghost.png", "text": "a ghost"},
    )
    scan = scan_dataset(root)
    assert relative(scan) == [("0000.png", "zero")]
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert reasons["ghost.png"] == f"missing file: {root / 'metadata.jsonl'}:4 names ghost.png"
    assert reasons["0001.png"] == f"no caption (empty 'text' at {root / 'metadata.jsonl'}:2)"
    assert scan.summary()["skipped_reasons"] == {"missing file": 1, "no caption": 2}


def test_images_over_max_pixels_are_refused(captions):
    Image.new("RGB", (32, 32)).save(captions / "small.png")
    (captions / "small.txt").write_text("small")
    scan = scan_dataset(captions, max_pixels=32 * 32)  # the samples are 64x64
    assert [e.path.name for e in scan.examples] == ["small.png"]
    assert scan.skipped[0].reason == "too large: 64x64 is over 1024 pixels"
    assert scan.summary()["skipped_reasons"] == {"too large": 6}


def test_decompression_bombs_are_refused_without_decoding(captions):
    (captions / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (captions / "bomb.txt").write_text("bomb")
    (captions / "bomb2.png").write_bytes(png_claiming(9000, 9000))  # 81 M pixels, PIL allows
    (captions / "bomb2.txt").write_text("bomb")
    scan = scan_dataset(captions)
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert set(reasons) == {"bomb.png", "bomb2.png"}
    assert reasons["bomb2.png"] == "too large: 9000x9000 is over 64000000 pixels"
    assert reasons["bomb.png"].startswith("too large: ")


# --- the dataset as a whole is wrong: DatasetError naming what and where


def test_missing_folder_or_a_file_instead(tmp_path):
    with pytest.raises(
        DatasetError, match=re.escape(f"dataset folder {tmp_path / 'nope'} is missing")
    ):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="file.png is not a folder"):
        scan_dataset(tmp_path / "file.png")


def test_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "empty" / "photo.gif").write_bytes(b"GIF89a")
    expected = (
        f"no images with suffixes .png, .jpg, .jpeg, .webp, .bmp found in {tmp_path / 'empty'}"
    )
    with pytest.raises(DatasetError, match=re.escape(expected)):
        scan_dataset(tmp_path / "empty")


def test_folder_where_every_image_is_bad_lists_the_reasons(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(5):
        (bad / f"{i}.png").write_bytes(b"nope")
        (bad / f"{i}.txt").write_text("x")
    Image.new("RGB", (4, 4)).save(bad / "uncaptioned.png")
    with pytest.raises(DatasetError) as info:
        scan_dataset(bad)
    message = str(info.value)
    assert message.startswith(f"no usable images in {bad}: all 6 were skipped: ")
    assert f"{bad / '0.png'}: does not decode" in message and "(and 3 more)" in message


def test_malformed_jsonl_line_names_the_line(tmp_path):
    root = write_sample_dataset(tmp_path / "j", count=3, layout="jsonl")
    meta = root / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], "", "{not json", *lines[1:]]) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{meta}:3: not valid JSON")):
        scan_dataset(root)
    write_jsonl(root, lines[0], '["0001.png", "a list"]')
    with pytest.raises(DatasetError, match=re.escape(f"{meta}:2: each line must be a JSON object")):
        scan_dataset(root)


@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_missing_column_names_it_and_the_columns_present(tmp_path, layout):
    root = write_sample_dataset(tmp_path / layout, count=2, layout=layout)
    meta = root / f"metadata.{layout}"
    with pytest.raises(DatasetError) as info:
        scan_dataset(root, caption_column="caption")
    assert str(info.value) == f"{meta}:1: no column 'caption'; columns present: file_name, text"
    with pytest.raises(DatasetError, match=re.escape(f"{meta}:1: no column 'image'")):
        scan_dataset(root, image_column="image")


def test_header_only_csv_still_checks_columns_and_then_says_it_is_empty(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "metadata.csv").write_text("path,text\n")
    with pytest.raises(DatasetError, match="no column 'file_name'; columns present: path, text"):
        scan_dataset(root)
    (root / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'metadata.csv'} lists no images")):
        scan_dataset(root)


def test_caption_that_is_not_text_is_an_error(tmp_path):
    root = write_jsonl(tmp_path / "j", {"file_name": "a.png", "text": 3})
    with pytest.raises(
        DatasetError, match=r"metadata.jsonl:1: caption column 'text' must hold text"
    ):
        scan_dataset(root)
    write_jsonl(root, {"file_name": 7, "text": "x"})
    with pytest.raises(
        DatasetError, match=r"metadata.jsonl:1: column 'file_name' must name an image"
    ):
        scan_dataset(root)


@pytest.mark.parametrize("bad_path", ["../outside.png", "/etc/passwd", "sub/../../x.png"])
@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_paths_escaping_the_folder_are_refused(tmp_path, bad_path, layout):
    root = write_sample_dataset(tmp_path / layout, count=2, layout=layout)
    rows = [{"file_name": "0000.png", "text": "ok"}, {"file_name": bad_path, "text": "x"}]
    if layout == "jsonl":
        write_jsonl(root, *rows)
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    line = 2 if layout == "jsonl" else 3
    expected = f"metadata.{layout}:{line}: image path {bad_path!r} must be relative"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        scan_dataset(root)


def test_both_metadata_files_is_ambiguous(tmp_path):
    root = write_sample_dataset(tmp_path / "j", count=2, layout="jsonl")
    (root / "metadata.csv").write_text("file_name,text\n0000.png,x\n")
    with pytest.raises(DatasetError, match="both metadata.jsonl and metadata.csv"):
        scan_dataset(root)


def test_metadata_without_rows(tmp_path):
    root = write_jsonl(tmp_path / "j", "", "  ")
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'metadata.jsonl'} lists no images")):
        scan_dataset(root)


# --- fingerprint and summary


def test_fingerprint_follows_pixels_and_captions_only(captions):
    first = scan_dataset(captions).fingerprint()
    assert scan_dataset(captions).fingerprint() == first  # a rescan changes nothing
    os.utime(captions / "0000.png", (0, 0))  # nor does a touch
    caption = (captions / "0000.txt").read_text()
    (captions / "0000.txt").write_text("  " + caption.replace(" ", "  \n"))  # nor whitespace
    assert scan_dataset(captions).fingerprint() == first

    (captions / "0000.txt").write_text("a different caption")
    second = scan_dataset(captions).fingerprint()
    assert second != first

    image = Image.open(captions / "0001.png").convert("RGB")
    image.putpixel((0, 0), tuple(255 - c for c in image.getpixel((0, 0))))
    image.save(captions / "0001.png")
    assert scan_dataset(captions).fingerprint() not in (first, second)


def test_fingerprint_from_the_scan_equals_one_from_the_files(captions):
    scan = scan_dataset(captions)
    rebuilt = DatasetScan(scan.root, scan.layout, scan.examples, scan.skipped)
    assert rebuilt.fingerprint() == scan.fingerprint()
    assert len(scan.fingerprint()) == 64 and int(scan.fingerprint(), 16) >= 0


def test_summary_is_json_with_counts_reasons_and_fingerprint(captions):
    (captions / "0005.txt").unlink()
    scan = scan_dataset(captions)
    summary = json.loads(json.dumps(scan.summary()))
    assert summary == {
        "root": str(captions),
        "layout": "captions",
        "examples": 5,
        "skipped": 1,
        "skipped_reasons": {"no caption": 1},
        "fingerprint": scan.fingerprint(),
    }
