"""The command lines a user types: bentolora-models and python -m train, as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from train.metrics import read_metrics

ROOT = Path(__file__).parent.parent


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=cwd or ROOT,
        timeout=600,
    )


def test_build_tiny_is_idempotent(tiny_base):
    first = run("-m", "models", "build-tiny")
    second = run("-m", "models", "build-tiny")
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    assert first.stdout == second.stdout == f"base: {tiny_base.tag}\n"


def test_import_from_a_local_folder(tiny_base, tmp_path):
    from models.tiny import build_tiny_pipeline

    folder = tmp_path / "tiny-folder"
    build_tiny_pipeline(seed=5).save_pretrained(folder)
    result = run(
        "-m", "models", "import", str(folder), "--name", "sdxl-from-folder", "--dtype", "float32"
    )
    assert result.returncode == 0, result.stderr
    tag = result.stdout.strip().removeprefix("base: ")
    shown = json.loads(run("-m", "models", "show", tag).stdout)
    assert shown["metadata"]["source"] == f"folder:{folder}"
    assert shown["metadata"]["dtype"] == "float32"
    assert shown["labels"]["bentolora.kind"] == "base"
    listed = run("-m", "models", "list").stdout
    assert tag in listed and tiny_base.tag in listed


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("sdxl-tiny", "already a store tag"),
        ("/nowhere/model.ckpt", "pickled checkpoints are refused"),
        ("/nowhere/model.safetensors", "no such file"),
        ("./no/such/folder", "no such folder"),
    ],
)
def test_import_refuses_bad_sources_clearly(tiny_base, source, message):
    result = run("-m", "models", "import", source, "--name", "x")
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_train_cli_reports_a_missing_base_without_a_traceback(tiny_base, sample_dir, tmp_path):
    result = run(
        "-m",
        "train",
        "--base",
        "sdxl-missing",
        "--data-dir",
        str(sample_dir),
        "--name",
        "x",
        "--output-dir",
        str(tmp_path),
    )
    assert result.returncode == 1
    assert "'sdxl-missing' is not in the model store" in result.stderr
    assert "Traceback" not in result.stderr
    # transformers' warning about torchvision for the CLIP image processor (see models/__init__)
    assert "torchvision" not in result.stderr


@pytest.mark.slow
def test_quickstart_recipe_end_to_end(tiny_base, tmp_path):
    from models.clip import build_tiny_clip, save_clip

    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0")  # the recipe's CLIP curve
    data = tmp_path / "sample"
    assert run("-m", "train", "sample-data", str(data)).returncode == 0
    result = run(
        "-m",
        "train",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--data-dir",
        str(data),
        "--output-dir",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "adapter: lora-quickstart:" in result.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "list"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    ).stdout
    assert "lora-quickstart" in listed and "sdxl-tiny" in listed
    run_dir = tmp_path / "runs" / "quickstart"
    assert (run_dir / "validation" / "step-00000200" / "00.png").is_file()
    check_report(run_dir, prompts=2, resolution=64, validations=(0, 100, 200))


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def check_report(run_dir: Path, *, prompts: int, resolution: int, validations: tuple) -> None:
    """report.html shows the curves and one grid per validation, all real, non-blank images."""
    from PIL import Image

    from train.report import PLOT_SIZE_PX

    parser = _Images()
    page = (run_dir / "report.html").read_text()
    parser.feed(page)
    sources = parser.sources
    expected_plots = ["loss", "lr", "validation_loss", "clip_score"]
    expected_grids = [f"grid-step-{step:08d}" for step in validations]
    assert [Path(s).stem for s in sources] == expected_plots + expected_grids
    for source in sources:
        image = Image.open(run_dir / source)
        image.load()
        if Path(source).stem in expected_plots:
            assert image.size == PLOT_SIZE_PX
        else:
            assert image.size == (prompts * resolution, resolution)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [None] * 2) > 1
    assert "a red circle on a blue background" in page and "rank" in page
    scored = [r["step"] for r in read_metrics(run_dir) if "clip_score" in r]
    assert scored == list(validations)
