"""Dataset discovery in three layouts, and every way a dataset can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from train.dataset import DatasetError, scan_dataset
from train.sample_data import write_sample_dataset


@pytest.fixture
def captions(tmp_path):
    return write_sample_dataset(tmp_path / "captions", count=6, layout="captions")


def test_three_layouts_scan_to_the_same_examples(tmp_path):
    scans = {
        layout: scan_dataset(write_sample_dataset(tmp_path / layout, count=6, layout=layout))
        for layout in ("captions", "jsonl", "csv")
    }
    pairs = {
        layout: [(e.path.name, e.caption) for e in scan.examples] for layout, scan in scans.items()
    }
    assert pairs["captions"] == pairs["jsonl"] == pairs["csv"]
    assert len(pairs["csv"]) == 6 and pairs["csv"][0][1].startswith("a ")
    assert {s.layout for s in scans.values()} == {"captions", "jsonl", "csv"}
    assert len({s.fingerprint() for s in scans.values()}) == 1  # same images, same captions


def test_captions_are_found_recursively(captions):
    sub = captions / "more" / "deep"
    sub.mkdir(parents=True)
    shutil.copy(captions / "0000.png", sub / "x.png")
    (sub / "x.txt").write_text("nested")
    scan = scan_dataset(captions)
    assert any(e.caption == "nested" for e in scan.examples) and len(scan.examples) == 7


def test_undecodable_and_truncated_images_are_skipped_and_counted(captions):
    (captions / "garbage.png").write_bytes(b"\x89PNG but not really")
    (captions / "garbage.txt").write_text("garbage")
    data = (captions / "0001.png").read_bytes()
    (captions / "truncated.png").write_bytes(data[: len(data) // 2])
    (captions / "truncated.txt").write_text("truncated")
    scan = scan_dataset(captions)
    assert len(scan.examples) == 6
    skipped = {s.path.name: s.reason for s in scan.skipped}
    assert set(skipped) == {"garbage.png", "truncated.png"}
    assert all(r.startswith("does not decode") for r in skipped.values())
    assert scan.summary()["skipped_reasons"] == {"does not decode": 2}


def test_images_without_captions_are_skipped_and_counted(captions):
    (captions / "0002.txt").unlink()
    (captions / "0003.txt").write_text("   \n")
    scan = scan_dataset(captions)
    assert len(scan.examples) == 4
    assert sorted(s.path.name for s in scan.skipped) == ["0002.png", "0003.png"]
    assert all("no caption" in s.reason for s in scan.skipped)


def test_decompression_bombs_are_skipped(captions):
    Image.new("L", (3000, 3000)).save(captions / "huge.png")
    (captions / "huge.txt").write_text("huge")
    scan = scan_dataset(captions, max_pixels=4_000_000)
    assert [s.path.name for s in scan.skipped] == ["huge.png"]
    assert "too large" in scan.skipped[0].reason


def test_missing_empty_and_all_bad_folders_stop_with_the_path(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'} is missing"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="empty: no images with suffixes .png"):
        scan_dataset(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"nope")
    with pytest.raises(
        DatasetError, match="no usable images.*all 1 skipped.*a.png: does not decode"
    ):
        scan_dataset(bad)


def test_jsonl_problems_name_the_line_and_column(tmp_path):
    root = write_sample_dataset(tmp_path / "j", count=3, layout="jsonl")
    meta = root / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: not valid JSON"):
        scan_dataset(root)
    meta.write_text(json.dumps({"file_name": "0000.png", "caption": "x"}) + "\n")
    with pytest.raises(
        DatasetError,
        match=r"metadata.jsonl:1: no column 'text'; columns present: file_name, caption",
    ):
        scan_dataset(root)
    assert scan_dataset(root, caption_column="caption").examples[0].caption == "x"


@pytest.mark.parametrize("bad_path", ["../outside.png", "/etc/passwd"])
def test_paths_escaping_the_folder_are_refused(tmp_path, bad_path):
    root = write_sample_dataset(tmp_path / "j", count=2, layout="jsonl")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": bad_path, "text": "x"}) + "\n")
    with pytest.raises(DatasetError, match="must stay inside the dataset folder"):
        scan_dataset(root)


def test_rows_naming_missing_files_are_skipped(tmp_path):
    root = write_sample_dataset(tmp_path / "c", count=3, layout="csv")
    with open(root / "metadata.csv", "a") as f:
        f.write("ghost.png,a ghost\n")
    scan = scan_dataset(root)
    assert len(scan.examples) == 3
    assert scan.skipped[0].path.name == "ghost.png" and "missing file" in scan.skipped[0].reason


def test_fingerprint_follows_pixels_and_captions_only(captions):
    first = scan_dataset(captions).fingerprint()
    assert scan_dataset(captions).fingerprint() == first  # a rescan changes nothing
    (captions / "0000.txt").write_text("a different caption")
    second = scan_dataset(captions).fingerprint()
    assert second != first
    image = Image.open(captions / "0001.png").convert("RGB")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(captions / "0001.png")
    assert scan_dataset(captions).fingerprint() not in (first, second)


def test_sample_data_is_deterministic(tmp_path):
    a = write_sample_dataset(tmp_path / "a", count=4, seed=3)
    b = write_sample_dataset(tmp_path / "b", count=4, seed=3)
    c = write_sample_dataset(tmp_path / "c", count=4, seed=4)
    files = sorted(p.name for p in a.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    with pytest.raises(ValueError, match="layout 'parquet' is not one of"):
        write_sample_dataset(tmp_path / "d", layout="parquet")
