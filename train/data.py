"""Files -> examples: the images and captions of a dataset folder, and each image made ready for
the VAE at its bucket's size with the SDXL micro-conditioning that describes it.

Read top to bottom, one example's way: `scan_dataset` finds the (image, caption) pairs in the
layouts users have and checks that every image decodes; `example_buckets` gives each one the
training size closest to its shape (`make_buckets`, `choose_bucket`); `prepare_image` resizes,
crops and mirrors it to that size and computes its `time_ids`. `train.batches` takes it from there
(VAE latents, caption embeddings, the disk cache, micro-batches).

Layouts:
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

Photos as phones write them: an image's EXIF orientation (a phone stores a portrait photo as a
landscape pixel array plus an orientation tag) is applied before anything else looks at its
shape, so the bucket, the crop and the micro-conditioning describe the upright image; colour modes
are converted to 8-bit RGB by the rule stated in `to_rgb`. The fingerprint stays a hash of the
file's bytes.

Held-out images: `training_data` keeps some images out of training, for `python -m train
evaluate` to judge the adapter with: a `validation_split` of the dataset (chosen by `hold_out`)
or a separate `validation_dir`.

SDXL is conditioned on the original size, the crop's top-left corner and the target size
(`time_ids`); they are computed as diffusers' `train_text_to_image_lora_sdxl.py` computes them, so
an adapter trained here sees the conditioning the base model was trained with.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from tqdm.auto import tqdm

from models.hashing import hash_file
from train.config import CROPS, TrainConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = {"jsonl": "metadata.jsonl", "csv": "metadata.csv"}
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Pillow opens 16-bit greyscale PNGs in these modes; their values run to 65535, not 255."""
TRANSPOSED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height (the 90° and 270° turns, mirrored or not)."""


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
            (self.relative(e), digest, e.caption)
            for e, digest in zip(self.examples, digests, strict=True)
        )
        total = hashlib.sha256()
        for entry in entries:
            for part in entry:
                total.update(part.encode("utf-8") + b"\0")
        return total.hexdigest()

    def subset(self, indices: Sequence[int], *, keep_skipped: bool = True) -> DatasetScan:
        """The same scan with only the examples at `indices` (in that order)."""
        digests = tuple(self.digests[i] for i in indices) if self.digests else ()
        examples = tuple(self.examples[i] for i in indices)
        skipped = self.skipped if keep_skipped else ()
        return DatasetScan(self.root, self.layout, examples, skipped, digests)

    def relative(self, example: Example) -> str:
        return example.path.relative_to(self.root).as_posix()

    def listing(self) -> dict[str, Any]:
        """Where the examples are, what each says and the sha256 of each file: enough to find
        exactly these images again (the adapter's metadata keeps it for its held-out images)."""
        digests = self.digests or tuple(hash_file(e.path) for e in self.examples)
        return {
            "root": str(self.root.resolve()),
            "images": [
                {"file": self.relative(e), "caption": e.caption, "sha256": d}
                for e, d in zip(self.examples, digests, strict=True)
            ],
        }

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
    layout, rows = _listed_rows(root, image_column, caption_column)
    rows.sort(key=lambda r: (r.path.relative_to(root).as_posix(), r.caption))
    examples, digests, skipped = _check_rows(rows, max_pixels)
    if not examples:
        shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise DatasetError(
            f"no usable images in {root}: all {len(skipped)} were skipped: {shown}{more}"
        )
    if skipped:
        log.warning("%s: %d images usable, %d skipped", root, len(examples), len(skipped))
    return DatasetScan(root, layout, tuple(examples), tuple(skipped), tuple(digests))


def _listed_rows(root: Path, image_column: str, caption_column: str) -> tuple[str, list[_Row]]:
    """The layout of `root` and the images it names, with their captions, not yet opened."""
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
    if not present:
        rows = _caption_file_rows(root)
        if not rows:
            raise DatasetError(
                f"no images with suffixes {', '.join(IMAGE_SUFFIXES)} found in {root} "
                "(nor a metadata.jsonl or metadata.csv)"
            )
        return "captions", rows
    layout = present[0]
    metadata = root / METADATA[layout]
    read = _jsonl_rows if layout == "jsonl" else _csv_rows
    rows = read(metadata, image_column, caption_column)
    if not rows:
        raise DatasetError(f"{metadata} lists no images; add one row per image")
    _log_unlisted(root, rows, metadata)
    return layout, rows


def _check_rows(
    rows: Sequence[_Row], max_pixels: int
) -> tuple[list[Example], list[str], list[Skipped]]:
    """(examples, the sha256 of each one's file, the rows skipped and why), in `rows` order."""
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
    return examples, digests, skipped


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
    what was verified.
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
                orientation(image)  # a broken EXIF block is found here, not while caching
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, f"too large: {err}"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return None, f"does not decode: {err}"
    return hashlib.sha256(data).hexdigest(), None


# --- images held out of training


def training_data(config: TrainConfig) -> tuple[DatasetScan, DatasetScan | None]:
    """(the examples to train on, the held-out examples or None), as the config says: all of
    data_dir; or data_dir less a `validation_split`; or data_dir, with `validation_dir` held out.

    A held-out image whose bytes equal a training image's is refused: it would be judged on an
    image it was trained on.
    """
    scan = scan_dataset(
        config.data_dir, caption_column=config.caption_column, image_column=config.image_column
    )
    if config.validation_split:
        return hold_out(scan, config.validation_split)
    if not config.validation_dir:
        return scan, None
    held = scan_dataset(
        config.validation_dir,
        caption_column=config.caption_column,
        image_column=config.image_column,
    )
    trained = dict(zip(scan.digests, scan.examples, strict=True))
    shared = [
        (e, trained[d]) for e, d in zip(held.examples, held.digests, strict=True) if d in trained
    ]
    if shared:
        pairs = "; ".join(f"{a.path} = {b.path}" for a, b in shared[:3])
        raise DatasetError(
            f"validation_dir {config.validation_dir}: {len(shared)} image(s) are also in data_dir "
            f"({pairs}); delete them from one of the two folders"
        )
    return scan, held


def hold_out(scan: DatasetScan, fraction: float) -> tuple[DatasetScan, DatasetScan]:
    """Split `scan` into (training, held-out) examples; round(fraction × examples) are held out,
    at least one.

    The rule: files are ranked by the sha256 of their path relative to the dataset folder and
    taken from the top, so the same images are held out every run and on every machine, and
    adding images to the folder moves few of them. Files with identical bytes stay on the same
    side (the first one's path ranks them), so no held-out image has a copy in training.
    """
    count = len(scan.examples)
    wanted = max(1, round(fraction * count))
    digests = scan.digests or tuple(hash_file(e.path) for e in scan.examples)
    copies: dict[str, list[int]] = {}
    for index, digest in enumerate(digests):
        copies.setdefault(digest, []).append(index)

    def rank(group: list[int]) -> str:
        return hashlib.sha256(scan.relative(scan.examples[group[0]]).encode()).hexdigest()

    held: list[int] = []
    for group in sorted(copies.values(), key=rank):
        if len(held) >= wanted:
            break
        held += group
    if len(held) >= count:
        raise DatasetError(
            f"validation_split {fraction} of the {count} usable images in {scan.root} leaves "
            "none to train on; lower validation_split or add images"
        )
    held_set = set(held)
    kept = [i for i in range(count) if i not in held_set]
    log.info("%d images held out of training, %d trained on", len(held), len(kept))
    return scan.subset(kept), scan.subset(sorted(held), keep_skipped=False)


# --- one example at its training size


@dataclass(frozen=True, order=True)
class Bucket:
    """A training size (pixels); every image in a batch is cropped to the same bucket."""

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
    """Bucket sizes of about `resolution`² pixels, NovelAI/kohya style, sorted.

    For each width (a multiple of `step` in [min_side, max_side]) the tallest height that is a
    multiple of `step` and keeps the area within resolution² is taken, and its transpose too.
    Smaller buckets of the same shape are left out on purpose: an image would train at a lower
    resolution than the budget allows for no gain. Sides default to resolution/2 .. resolution*2
    (clipped to multiples of `step`); shapes longer than `max_ratio`:1 are dropped; the square
    (resolution, resolution) is always included.
    """
    if resolution <= 0 or step <= 0:
        raise ValueError(f"resolution ({resolution}) and step ({step}) must be positive")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be at least 1, got {max_ratio}")
    low = resolution // 2 if min_side is None else min_side
    high = resolution * 2 if max_side is None else max_side
    low = max(step, math.ceil(low / step) * step)
    high = high // step * step
    if low > high:
        raise ValueError(
            f"no side fits: min_side {min_side} and max_side {max_side} leave no multiple of "
            f"{step} between them"
        )
    area = resolution * resolution
    buckets = {Bucket(resolution, resolution)}
    for width in range(low, high + 1, step):
        height = min(area // width // step * step, high)
        if height >= low and max(width, height) <= max_ratio * min(width, height):
            buckets.add(Bucket(width, height))
            buckets.add(Bucket(height, width))
    return sorted(buckets)


def choose_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's, on a log scale (so 2:1 and 1:2 are
    equally far from square); ties go to the larger bucket, then to the smaller (w, h)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    ratio = math.log(width / height)

    def distance(b: Bucket) -> tuple[float, int, Bucket]:
        # Rounded so that mirror-image buckets tie exactly despite floating-point noise.
        return (round(abs(math.log(b.width / b.height) - ratio), 9), -b.width * b.height, b)

    return min(buckets, key=distance)


def example_buckets(examples: Sequence[Example], config: TrainConfig) -> list[Bucket]:
    """Each example's training size: with `bucketing`, the bucket of about resolution² pixels
    closest to the image's shape; without, the square of side `resolution`."""
    square = Bucket(config.resolution, config.resolution)
    if not config.bucketing:
        return [square] * len(examples)
    buckets = make_buckets(config.resolution, step=config.bucket_step)
    chosen = []
    for example in examples:
        with Image.open(example.path) as image:
            chosen.append(choose_bucket(*upright_size(image), buckets))
    return chosen


@dataclass(frozen=True)
class Prepared:
    """One image ready for the VAE, with the SDXL micro-conditioning that describes it."""

    pixels: torch.Tensor
    """float32 (3, H, W) in [-1, 1], H and W those of the bucket."""
    time_ids: tuple[int, int, int, int, int, int]
    """(orig_h, orig_w, crop_top, crop_left, target_h, target_w), as SDXL expects."""


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 (as stored) to 8; 1 when it has none or an invalid one."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """The image as its EXIF orientation says it is seen (turned and mirrored as the tag says)."""
    return ImageOps.exif_transpose(image) if orientation(image) != 1 else image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `upright(image)`, without decoding the pixels."""
    width, height = image.size
    return (height, width) if orientation(image) in TRANSPOSED else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB for any mode, by one rule per kind of image:

    - transparency (RGBA, LA, PA, a palette or RGB with a transparent colour): composited over
      white, because transparent pixels usually hold black or garbage nobody meant to show;
    - palette (P): each index replaced by its palette colour;
    - CMYK: Pillow's conversion, R = (255 − C)(255 − K)/255 and likewise G from M, B from Y; an
      embedded ICC profile is not applied (convert such files with a colour-managed tool first if
      their exact colours matter);
    - 16-bit grey (I;16, I): value × 255/65535, rounded, rather than clipped (Pillow would clip
      every value over 255 to white); 16-bit colour PNGs reach here as 8-bit RGB(A), Pillow having
      kept each channel's high byte (at most one level below rounding);
    - grey, 1-bit and 32-bit float: Pillow's conversion (grey copied to the three channels).
    """
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """The size that scales (width, height) to cover `bucket` with one side matching exactly.

    The other side is floored, as torchvision's `Resize` (used by the diffusers scripts) does.
    Integer arithmetic keeps a 3:1 image from becoming 191 pixels wide instead of 192.
    """
    if width * bucket.height >= height * bucket.width:  # wider than the bucket: heights match
        return max(bucket.width, width * bucket.height // height), bucket.height
    return bucket.width, max(bucket.height, height * bucket.width // width)


def prepare_image(
    image: Image.Image,
    bucket: Bucket,
    *,
    crop: str = "center",
    flip: bool = False,
    rng: random.Random | None = None,
) -> Prepared:
    """Turn `image` upright (EXIF orientation), make it RGB (`to_rgb`), resize it to cover
    `bucket` (Lanczos), crop to it, optionally mirror it.

    Center crops are placed as diffusers places them (`round(margin / 2)`); random crops draw
    from `rng`, so a run is repeatable. crop_top/crop_left are in the resized image's pixels. For
    a flip, crop_left is where the crop sits in the mirrored resized image (`new_w - left - w`):
    the geometrically true corner. (The diffusers script computes `w - left` there, which only
    agrees when the resized image is exactly twice the bucket's width.)
    """
    if crop not in CROPS:
        raise ValueError(f"crop {crop!r} is not one of {', '.join(CROPS)}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng (a random.Random) so crops are repeatable")
    image = to_rgb(upright(image))
    orig_w, orig_h = image.size
    new_w, new_h = cover_size(orig_w, orig_h, bucket)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if crop == "center":
        top = int(round((new_h - bucket.height) / 2.0))
        left = int(round((new_w - bucket.width) / 2.0))
    else:
        assert rng is not None
        top = rng.randint(0, new_h - bucket.height)
        left = rng.randint(0, new_w - bucket.width)
    image = image.crop((left, top, left + bucket.width, top + bucket.height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - left - bucket.width
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return Prepared(pixels, (orig_h, orig_w, top, left, bucket.height, bucket.width))
