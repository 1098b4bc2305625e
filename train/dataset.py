"""Finding images and captions in the layouts users have.

- a folder of images with a `.txt` caption beside each (`a.png` + `a.txt`), searched recursively;
- Hugging Face imagefolder: `metadata.jsonl` or `metadata.csv` in the folder, with a file column
  and a caption column, paths relative to the folder.

As in Hugging Face `datasets`, files and folders whose names start with `.` or `__` are ignored
(`.ipynb_checkpoints`, `__MACOSX`, macOS `._a.png` resource forks would otherwise show up as
duplicate or broken images).

A single bad image (undecodable, too large, uncaptioned, missing) is skipped, counted and logged,
so one broken download does not stop a long run; a problem with the dataset as a whole (missing
folder, no images, bad metadata, nothing usable) raises `DatasetError` naming the file, line or
column at fault.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from models.hashing import hash_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LAYOUTS = ("captions", "jsonl", "csv")
METADATA = {"jsonl": "metadata.jsonl", "csv": "metadata.csv"}


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the path, line or column at fault."""


@dataclass(frozen=True)
class Example:
    """One usable training pair: an image that decodes and a non-empty caption."""

    path: Path
    caption: str
    """Whitespace runs collapsed to one space, as CLIP's tokenizer would see it anyway."""


@dataclass(frozen=True)
class Skipped:
    """An image left out of training, and why, so the user can fix or delete it."""

    path: Path
    reason: str
    """`<kind>: <detail>`; the kind is what `DatasetScan.summary` counts."""


@dataclass(frozen=True)
class DatasetScan:
    """What `scan_dataset` found: the usable examples, sorted by relative path, and the rest."""

    root: Path
    layout: str
    """captions, jsonl or csv"""
    examples: tuple[Example, ...]
    skipped: tuple[Skipped, ...]
    digests: tuple[str, ...] = field(default=(), repr=False)
    """sha256 of each example's file as it was read and verified by the scan (same order), so the
    fingerprint names the bytes that were checked without reading every image again."""

    def fingerprint(self) -> str:
        """sha256 over sorted (relative path, sha256 of the file, caption) of every example.

        It changes when any image byte or caption changes and on nothing else (not on mtimes, not
        on the layout the captions came from), so latent caches keyed by it neither go stale nor
        get rebuilt for nothing, and an adapter's metadata names exactly the data it saw.
        """
        digests = self.digests
        if len(digests) != len(self.examples):
            digests = tuple(hash_file(e.path) for e in self.examples)
        entries = sorted(
            (e.path.relative_to(self.root).as_posix(), digest, e.caption)
            for e, digest in zip(self.examples, digests, strict=True)
        )
        total = hashlib.sha256()
        for entry in entries:
            for part in entry:
                total.update(part.encode("utf-8") + b"\0")
        return total.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Counts, skip reasons by kind and the fingerprint: JSON for the adapter's metadata."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "examples": len(self.examples),
            "skipped": len(self.skipped),
            "skipped_reasons": dict(sorted(Counter(_kind(s.reason) for s in self.skipped).items())),
            "fingerprint": self.fingerprint(),
        }


def scan_dataset(
    root: str | Path,
    *,
    caption_column: str = "text",
    image_column: str = "file_name",
    max_pixels: int = 64_000_000,
) -> DatasetScan:
    """Find every usable (image, caption) pair under `root`, decoding each image once to be sure.

    The layout is `jsonl` if `root/metadata.jsonl` exists, `csv` if `root/metadata.csv` does, and
    `captions` (`.txt` beside each image) otherwise. Images over `max_pixels` are refused as
    decompression bombs before they are decoded (Pillow's own `Image.MAX_IMAGE_PIXELS` also applies).
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} is missing; pass a folder of images")
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is not a folder; pass a folder of images")
    present = [layout for layout, name in METADATA.items() if (root / name).is_file()]
    if len(present) > 1:
        raise DatasetError(
            f"{root} holds both metadata.jsonl and metadata.csv; keep one of them so it is clear "
            "which captions to use"
        )
    layout = present[0] if present else "captions"
    if layout == "captions":
        rows = _caption_file_rows(root)
        if not rows:
            raise DatasetError(
                f"no images with suffixes {', '.join(IMAGE_SUFFIXES)} found in {root} "
                "(nor a metadata.jsonl or metadata.csv)"
            )
    else:
        metadata = root / METADATA[layout]
        read = _jsonl_rows if layout == "jsonl" else _csv_rows
        rows = read(metadata, image_column, caption_column)
        if not rows:
            raise DatasetError(f"{metadata} lists no images; add one row per image")
        _log_unlisted(root, rows, metadata)

    rows.sort(key=lambda r: (r.path.relative_to(root).as_posix(), r.caption))
    examples, digests, skipped = [], [], []
    for row in tqdm(
        rows, desc="checking images", unit="image", disable=True if len(rows) < 100 else None
    ):
        digest, reason = None, row.problem
        if reason is None:
            digest, reason = _read_image(row.path, max_pixels)
        if reason is None and not row.caption:
            reason = row.no_caption
        if reason is not None:
            log.warning("skipping %s: %s", row.path, reason)
            skipped.append(Skipped(row.path, reason))
        else:
            examples.append(Example(row.path, row.caption))
            digests.append(digest)
    if not examples:
        shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise DatasetError(
            f"no usable images in {root}: all {len(skipped)} were skipped: {shown}{more}"
        )
    if skipped:
        log.warning("%s: %d images usable, %d skipped", root, len(examples), len(skipped))
    return DatasetScan(root, layout, tuple(examples), tuple(skipped), tuple(digests))


@dataclass(frozen=True)
class _Row:
    """An image the layout names, with its caption, before the image itself is checked."""

    path: Path
    caption: str
    no_caption: str
    """The skip reason to give if the caption turns out empty."""
    problem: str | None = None
    """A reason to skip found without opening the image (the file does not exist)."""


def _clean(caption: str) -> str:
    return " ".join(caption.split())


def _kind(reason: str) -> str:
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def _ignored(relative: Path) -> bool:
    return any(part.startswith((".", "__")) for part in relative.parts)


def _caption_file_rows(root: Path) -> list[_Row]:
    rows = []
    for path in root.rglob("*"):
        if (
            path.suffix.lower() in IMAGE_SUFFIXES
            and not _ignored(path.relative_to(root))
            and path.is_file()
        ):
            txt = path.with_suffix(".txt")
            text = txt.read_text(encoding="utf-8-sig", errors="replace") if txt.is_file() else ""
            rows.append(_Row(path, _clean(text), f"no caption ({txt.name} missing or empty)"))
    return rows


def _resolve(root: Path, name: object, column: str, where: str) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"{where}: column {column!r} must name an image file, got {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise DatasetError(
            f"{where}: image path {name!r} must be relative to the dataset folder {root} and stay "
            "inside it (no leading '/', no '..')"
        )
    return root / relative


def _row(
    root: Path, record: dict[Any, Any], image_column: str, caption_column: str, where: str
) -> _Row:
    for column in (image_column, caption_column):
        if column not in record:
            present = ", ".join(str(k) for k in record if k is not None)
            raise DatasetError(f"{where}: no column {column!r}; columns present: {present}")
    path = _resolve(root, record[image_column], image_column, where)
    caption = record[caption_column]
    if caption is not None and not isinstance(caption, str):
        raise DatasetError(
            f"{where}: caption column {caption_column!r} must hold text, got {caption!r}"
        )
    problem = None if path.is_file() else f"missing file: {where} names {record[image_column]}"
    no_caption = f"no caption (empty {caption_column!r} at {where})"
    return _Row(path, _clean(caption or ""), no_caption, problem)


def _jsonl_rows(path: Path, image_column: str, caption_column: str) -> list[_Row]:
    rows = []
    text = path.read_text(encoding="utf-8-sig")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{where}: not valid JSON ({err.msg}); one object per line"
            ) from None
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: each line must be a JSON object, got {line.strip()[:40]}")
        rows.append(_row(path.parent, record, image_column, caption_column, where))
    return rows


def _csv_rows(path: Path, image_column: str, caption_column: str) -> list[_Row]:
    # utf-8-sig: spreadsheets write a byte-order mark that would otherwise rename the first column.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for column in (image_column, caption_column):
            if column not in header:
                raise DatasetError(
                    f"{path}:1: no column {column!r}; columns present: {', '.join(header)}"
                )
        return [
            _row(path.parent, record, image_column, caption_column, f"{path}:{reader.line_num}")
            for record in reader
        ]


def _log_unlisted(root: Path, rows: Iterable[_Row], metadata: Path) -> None:
    """Say so when images sit in the folder unused: a forgotten metadata row is an easy mistake."""
    listed = {row.path for row in rows}
    unlisted = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p not in listed
        and not _ignored(p.relative_to(root))
    ]
    if unlisted:
        log.info(
            "%d images in %s are not named in %s and are not used",
            len(unlisted),
            root,
            metadata.name,
        )


def _read_image(path: Path, max_pixels: int) -> tuple[str | None, str | None]:
    """(sha256 of the file, None) if it decodes fully and is not too large, else (None, why not).

    The bytes are read once, hashed and decoded from memory, so the fingerprint describes exactly
    what was verified. EXIF orientation is not applied: the pixels are used as stored.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, f"does not read: {err}"
    try:
        with warnings.catch_warnings():
            # Pillow only warns below twice its limit; a warning here means a bomb, not a nuisance.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return None, f"too large: {width}x{height} is over {max_pixels} pixels"
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, f"too large: {err}"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return None, f"does not decode: {err}"
    return hashlib.sha256(data).hexdigest(), None
