"""The report's smoothing and grids (the whole report is checked on the quickstart run in
test_cli.py)."""

from __future__ import annotations

from PIL import Image

from train.report import smooth, validation_grid


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smooth([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]  # no pull towards zero at the start
    values = smooth([1.0, 0.0], weight=0.5)
    assert values[0] == 1.0 and abs(values[1] - (0.5 * 0.5) / 0.75) < 1e-12


def test_grid_puts_images_side_by_side_in_prompt_order(tmp_path):
    folder = tmp_path / "step-00000010"
    folder.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (8, 8), color).save(folder / f"{i:02d}.png")
    grid = Image.open(validation_grid(folder, tmp_path / "grid.png"))
    assert grid.size == (16, 8)
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((15, 7)) == (0, 0, 255)
    empty = tmp_path / "none"
    empty.mkdir()
    assert validation_grid(empty, tmp_path / "g2.png") is None
