"""Finding images and captions in the layouts users have.

- a folder of images with a `.txt` caption beside each (`a.png` + `a.txt`), searched recursively;
- Hugging Face imagefolder: `metadata.jsonl` or `metadata.csv` with a file column and a caption
  column, paths relative to the folder.

Single bad images (undecodable, oversized, uncaptioned) are skipped and counted; problems with
the dataset as a whole stop the run with a message naming the file, line or column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from models.hashing import hash_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the path, line or column at fault."""


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetScan:
    root: Path
    layout: str
    """captions, jsonl or csv"""
    examples: tuple[Example, ...]
    skipped: tuple[Skipped, ...]

    def fingerprint(self) -> str:
        """sha256 over each example's relative path, image bytes and caption, in order.

        Changes when any pixel file or caption changes, so caches keyed by it never go stale.
        """
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(example.path.relative_to(self.root).as_posix().encode() + b"\0")
            digest.update(hash_file(example.path).encode() + b"\0")
            digest.update(example.caption.encode() + b"\0")
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Counts and fingerprint, JSON-serializable, for the adapter's metadata."""
        reasons = Counter(s.reason.split(":", 1)[0] for s in self.skipped)
        return {
            "root": str(self.root),
            "layout": self.layout,
            "examples": len(self.examples),
            "skipped": len(self.skipped),
            "skipped_reasons": dict(reasons),
            "fingerprint": self.fingerprint(),
        }


def scan_dataset(
    root: str | Path,
    *,
    caption_column: str = "text",
    image_column: str = "file_name",
    max_pixels: int = 64_000_000,
) -> DatasetScan:
    """Find every usable (image, caption) pair under `root`."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} is missing")
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is not a folder")
    if (root / "metadata.jsonl").is_file():
        layout, rows = "jsonl", _jsonl_rows(root / "metadata.jsonl", image_column, caption_column)
    elif (root / "metadata.csv").is_file():
        layout, rows = "csv", _csv_rows(root / "metadata.csv", image_column, caption_column)
    else:
        layout, rows = "captions", _caption_file_rows(root)
    if not rows:
        raise DatasetError(
            f"dataset folder {root} is empty: no images with suffixes {', '.join(IMAGE_SUFFIXES)}"
        )
    examples, skipped = [], []
    for path, caption, reason in sorted(rows, key=lambda r: r[0].as_posix()):
        reason = reason or _image_problem(path, max_pixels)
        if reason is None and not caption.strip():
            reason = "no caption (.txt missing or empty, or an empty caption)"
        if reason:
            log.warning("skipping %s: %s", path, reason)
            skipped.append(Skipped(path, reason))
        else:
            examples.append(Example(path, caption.strip()))
    if not examples:
        shown = "; ".join(f"{s.path.name}: {s.reason}" for s in skipped[:3])
        raise DatasetError(f"no usable images in {root}: all {len(skipped)} skipped ({shown})")
    return DatasetScan(root, layout, tuple(examples), tuple(skipped))


Row = tuple[Path, str, "str | None"]


def _caption_file_rows(root: Path) -> list[Row]:
    rows = []
    for path in root.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            txt = path.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""
            rows.append((path, caption, None))
    return rows


def _resolve(root: Path, name: object, where: str) -> Path:
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{where}: the image path is empty or not a string")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise DatasetError(f"{where}: image path {name!r} must stay inside the dataset folder")
    return root / relative


def _row(root: Path, record: dict, image_column: str, caption_column: str, where: str) -> Row:
    for column in (image_column, caption_column):
        if column not in record:
            raise DatasetError(
                f"{where}: no column {column!r}; columns present: {', '.join(map(str, record))}"
            )
    path = _resolve(root, record[image_column], where)
    caption = record[caption_column]
    caption = caption if isinstance(caption, str) else ""
    reason = None if path.is_file() else f"missing file: {where} names {record[image_column]}"
    return path, caption, reason


def _jsonl_rows(path: Path, image_column: str, caption_column: str) -> list[Row]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: each line must be a JSON object")
        rows.append(_row(path.parent, record, image_column, caption_column, where))
    return rows


def _csv_rows(path: Path, image_column: str, caption_column: str) -> list[Row]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return [
            _row(path.parent, record, image_column, caption_column, f"{path}:{number}")
            for number, record in enumerate(reader, start=2)
        ]


def _image_problem(path: Path, max_pixels: int) -> str | None:
    """None if the image decodes fully and is not a decompression bomb, else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > max_pixels:
                    return f"too large: {image.width}x{image.height} is over {max_pixels} pixels"
                image.load()
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        return f"does not decode: {err}"
    return None
