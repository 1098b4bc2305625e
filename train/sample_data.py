"""A small dataset the project draws itself (no binary files in git): shapes with captions.

Each image is a coloured shape on a coloured background, and its caption says which, so an
adapter trained on it has something learnable and a reviewer can see whether it was learnt.
"""

from __future__ import annotations

import csv
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


def _draw(shape: str, fg: tuple[int, int, int], bg: tuple[int, int, int], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    m = size // 5
    if shape == "circle":
        draw.ellipse((m, m, size - m, size - m), fill=fg)
    elif shape == "square":
        draw.rectangle((m, m, size - m, size - m), fill=fg)
    elif shape == "triangle":
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fg)
    else:
        band = max(1, size // 8)
        for x in range(0, size, 2 * band):
            draw.rectangle((x, 0, x + band - 1, size), fill=fg)
    return image


def write_sample_dataset(
    root: str | Path, *, count: int = 8, size: int = 64, layout: str = "captions", seed: int = 0
) -> Path:
    """Write `count` images of `size`² with captions in `layout`; the same bytes for the same seed."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.sample(names, 2)
        caption = f"a {fg} {shape} on a {bg} background"
        file_name = f"{i:04d}.png"
        _draw(shape, COLOURS[fg], COLOURS[bg], size).save(root / file_name, optimize=False)
        if layout == "captions":
            (root / file_name).with_suffix(".txt").write_text(caption + "\n")
        rows.append({"file_name": file_name, "text": caption})
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif layout == "csv":
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return root
