"""What an evaluation reads: the prompts file (with optional reference images) and a reference folder.

Prompts file: `.txt`, one prompt a line (blank lines and lines starting with `#` ignored), or
`.jsonl`, one object a line: `{"prompt": "...", "image": "optional/path.png"}`, the image path
relative to the file's folder. Rows with an image are compared with it pixel by pixel (SSIM,
lpips_clip). A reference folder holds real images that the generated set is compared with as
a distribution (fid_clip, kid_clip).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from train.dataset import IMAGE_SUFFIXES
from train.preprocess import to_rgb


class EvaluationInputError(ValueError):
    """A prompts file, reference image or reference folder cannot be used; says which and why."""


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    reference: Path | None = None
    """A real image for this prompt, compared pairwise with what is generated from it."""


def read_prompts(path: str | Path) -> list[PromptRow]:
    """The rows of a `.txt` or `.jsonl` prompts file; at least one, else EvaluationInputError."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"prompts file {path}: no such file")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise EvaluationInputError(
            f"prompts file {path}: use .txt (one prompt a line) or .jsonl "
            '({"prompt": ..., "image": optional path})'
        )
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationInputError(f"prompts file {path}: does not read as UTF-8 ({err})") from err
    if path.suffix.lower() == ".txt":
        rows = [PromptRow(s) for line in lines if (s := line.strip()) and not s.startswith("#")]
    else:
        rows = [
            _jsonl_row(path, number, line)
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]
    if not rows:
        raise EvaluationInputError(f"prompts file {path} holds no prompts")
    return rows


def _jsonl_row(path: Path, number: int, line: str) -> PromptRow:
    where = f"prompts file {path}, line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise EvaluationInputError(f"{where}: not JSON ({err})") from err
    if not isinstance(row, dict):
        raise EvaluationInputError(f'{where}: expected an object like {{"prompt": "..."}}')
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvaluationInputError(f'{where}: "prompt" must be a non-empty string')
    image = row.get("image")
    if image is None or image == "":
        return PromptRow(prompt.strip())
    if not isinstance(image, str):
        raise EvaluationInputError(f'{where}: "image" must be a path relative to {path.parent}')
    reference = (path.parent / image).resolve()
    if not reference.is_file():
        raise EvaluationInputError(f"{where}: reference image {reference}: no such file")
    return PromptRow(prompt.strip(), reference)


def open_image(path: Path) -> Image.Image:
    """Decode `path` fully into 8-bit RGB, or raise EvaluationInputError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise EvaluationInputError(f"image {path}: too large ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise EvaluationInputError(f"image {path}: not a readable image ({err})") from err


def read_reference_dir(path: str | Path) -> list[Image.Image]:
    """Every image directly in folder `path` (sorted by name), decoded; at least 2 (FID needs a
    covariance), else EvaluationInputError."""
    path = Path(path)
    if not path.is_dir():
        raise EvaluationInputError(f"reference folder {path}: no such folder")
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if len(files) < 2:
        raise EvaluationInputError(
            f"reference folder {path}: {len(files)} images with suffixes "
            f"{', '.join(IMAGE_SUFFIXES)}; fid_clip and kid_clip need at least 2"
        )
    return [open_image(p) for p in files]
