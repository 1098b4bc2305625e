"""A small dataset the project draws itself (no binary files in git): shapes with captions.

Each image is one coloured shape on a background of another colour, and its caption says which
("a red circle on a blue background"), so an adapter trained on it has something learnable and a
reviewer can see at a glance whether it was learnt. Same seed, same bytes: tests and quickstarts
that train on it are repeatable.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "stripes")
LAYOUTS = ("captions", "jsonl", "csv")
MIN_SIZE = 16


def caption_for(shape: str, fg: str, bg: str) -> str:
    """The caption of one drawing; stripes are plural, so they get no article."""
    thing = f"{fg} stripes" if shape == "stripes" else f"a {fg} {shape}"
    return f"{thing} on a {bg} background"


def draw_shape(shape: str, fg: str, bg: str, size: int) -> Image.Image:
    """A `size`² RGB image of `shape` in colour `fg` on `bg`, centred with a 1/5 margin."""
    image = Image.new("RGB", (size, size), COLOURS[bg])
    draw = ImageDraw.Draw(image)
    m = size // 5
    if shape == "circle":
        draw.ellipse((m, m, size - m, size - m), fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle((m, m, size - m, size - m), fill=COLOURS[fg])
    elif shape == "triangle":
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=COLOURS[fg])
    elif shape == "stripes":
        band = max(1, size // 8)
        for x in range(0, size, 2 * band):
            draw.rectangle((x, 0, x + band - 1, size), fill=COLOURS[fg])
    else:
        raise ValueError(f"shape {shape!r} is not one of {', '.join(SHAPES)}")
    return image


def write_sample_dataset(
    root: str | Path, *, count: int = 8, size: int = 64, layout: str = "captions", seed: int = 0
) -> Path:
    """Write `count` images of `size`² pixels with captions in `layout`; returns `root`.

    Shapes take turns so every shape appears; colours are drawn from `seed`. Writing again with the
    same arguments overwrites the same files with the same bytes. A folder holding anything else is
    refused, so the sample never mixes into a real dataset (or a stale metadata file of another
    layout silently decides which captions are read).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    root = Path(root)
    files = sample_files(count=count, size=size, layout=layout, seed=seed)
    if root.exists():
        others = sorted(p.name for p in root.iterdir() if p.name not in files)
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise FileExistsError(
                f"{root} already holds other files ({shown}); write the sample dataset to an "
                "empty or new folder"
            )
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def sample_files(*, count: int, size: int, layout: str, seed: int) -> dict[str, bytes]:
    """The dataset's files by name: `NNNN.png`, and `NNNN.txt` or the layout's metadata file."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    rows = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.sample(list(COLOURS), 2)
        caption = caption_for(shape, fg, bg)
        file_name = f"{i:04d}.png"
        buffer = io.BytesIO()
        draw_shape(shape, fg, bg, size).save(buffer, format="PNG")
        files[file_name] = buffer.getvalue()
        if layout == "captions":
            files[f"{i:04d}.txt"] = (caption + "\n").encode()
        rows.append({"file_name": file_name, "text": caption})
    if layout == "jsonl":
        files["metadata.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    elif layout == "csv":
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["file_name", "text"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        files["metadata.csv"] = text.getvalue().encode()
    return files
