"""The generated sample dataset: repeatable bytes, captions that say what is drawn, all layouts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from train.data import scan_dataset
from train.sample_data import COLOURS, LAYOUTS, SHAPES, write_sample_dataset

CAPTION = re.compile(r"^(?:a )?(\w+) (circle|square|triangle|stripes) on a (\w+) background$")


def contents(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = contents(write_sample_dataset(tmp_path / "a", count=8, seed=3))
    b = contents(write_sample_dataset(tmp_path / "b", count=8, seed=3))
    c = contents(write_sample_dataset(tmp_path / "c", count=8, seed=4))
    assert a == b
    assert sorted(a) == sorted(c) and a != c
    assert sorted(a) == [f"{i:04d}.{ext}" for i in range(8) for ext in ("png", "txt")]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_scans_cleanly_to_the_same_examples(tmp_path, layout):
    reference = scan_dataset(write_sample_dataset(tmp_path / "ref", count=8, size=32))
    scan = scan_dataset(write_sample_dataset(tmp_path / layout, count=8, size=32, layout=layout))
    assert scan.layout == layout and not scan.skipped and len(scan.examples) == 8
    assert [(e.path.name, e.caption) for e in scan.examples] == [
        (e.path.name, e.caption) for e in reference.examples
    ]
    assert scan.fingerprint() == reference.fingerprint()  # the images are the same bytes


def test_images_are_what_their_captions_say(tmp_path):
    size = 64
    scan = scan_dataset(write_sample_dataset(tmp_path / "d", count=12, size=size, seed=1))
    shapes = set()
    for example in scan.examples:
        match = CAPTION.match(example.caption)
        assert match, example.caption
        fg, shape, bg = match.groups()
        assert fg != bg and fg in COLOURS and bg in COLOURS
        shapes.add(shape)
        image = Image.open(example.path)
        assert image.size == (size, size) and image.mode == "RGB"
        if shape == "stripes":
            band = size // 8
            assert image.getpixel((0, size // 2)) == COLOURS[fg]
            assert image.getpixel((band, size // 2)) == COLOURS[bg]
        else:
            assert image.getpixel((size // 2, size // 2 + 4)) == COLOURS[fg]
            assert image.getpixel((1, 1)) == COLOURS[bg]
    assert shapes == set(SHAPES)
    assert len({e.path.read_bytes() for e in scan.examples}) == 12  # no two images alike


def test_grammar_of_captions(tmp_path):
    scan = scan_dataset(write_sample_dataset(tmp_path / "d", count=4))
    captions = [e.caption for e in scan.examples]
    assert captions[0].startswith("a ") and " circle on a " in captions[0]
    assert not captions[3].startswith("a ") and " stripes on a " in captions[3]


def test_writing_again_is_idempotent_but_never_mixes_into_other_files(tmp_path):
    root = write_sample_dataset(tmp_path / "d", count=3, layout="jsonl")
    before = contents(root)
    assert contents(write_sample_dataset(root, count=3, layout="jsonl")) == before
    with pytest.raises(FileExistsError, match=r"already holds other files \(metadata.jsonl\)"):
        # a metadata.jsonl left behind would decide which captions are read
        write_sample_dataset(root, count=3, layout="captions")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="holiday.jpg"):
        write_sample_dataset(tmp_path / "mine")
    assert contents(root) == before and [p.name for p in (tmp_path / "mine").iterdir()] == [
        "holiday.jpg"
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "parquet"}, "layout 'parquet' is not one of captions, jsonl, csv"),
        ({"count": 0}, "count must be at least 1"),
        ({"size": 4}, "size must be at least 16"),
    ],
)
def test_bad_arguments_say_what_is_allowed(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_sample_dataset(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()
