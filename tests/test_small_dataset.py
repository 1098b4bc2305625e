"""The small-dataset workflow end to end on the quick-test recipe at its own size (128²), on the
tiny base: selftest, train with images held out, evaluate on them, the recipe's gates refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.adapter import get_adapter
from models.clip import build_tiny_clip, save_clip
from models.stages import STAGE_LABEL
from models.store import get_entry
from train.sample_data import write_sample_dataset

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "configs" / "medical-128-quick.yaml"

pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=ROOT,
        timeout=900,
    )


def test_quick_recipe_selftest_train_evaluate(tiny_base, tmp_path):
    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    # seed 1: twenty different drawings (seed 0 repeats two, which the selftest refuses)
    data = write_sample_dataset(tmp_path / "wounds" / "phase-I", count=20, size=128, seed=1)
    # the recipe as written, but on the tiny base and a few steps (on a CPU)
    recipe = [
        "--config", str(RECIPE), "--base", "sdxl-tiny", "--data-dir", str(data),
        "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
        "--max-steps", "4", "--checkpoint-every", "2", "--validation-every", "2",
        "--validation-inference-steps", "2", "--no-tensorboard",
    ]  # fmt: skip

    selftest = run("selftest", *recipe)
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr[-2000:]
    assert "18 to train, 2 held out" in selftest.stdout
    assert "2 steps of 4 examples at 128²" in selftest.stdout

    trained = run(*recipe)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "adapter: lora-wounds-quick:" in trained.stdout
    adapter = get_adapter("wounds-quick")
    meta = adapter.metadata
    assert meta["training_config"]["resolution"] == 128
    assert meta["training_config"]["mixed_precision"] == "bf16"
    assert meta["dataset"]["examples"] == 18 and meta["dataset"]["held_out"]["examples"] == 2
    run_dir = tmp_path / "runs" / "wounds-quick"
    assert (run_dir / "validation" / "step-00000004" / "00.png").is_file()

    out = tmp_path / "eval"
    evaluated = run("evaluate", "--adapter", adapter.tag, "--steps", "2", "--seeds-per-prompt",
                    "2", "--promote", "--margin=-1e9", "--out", str(out))  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "2 prompts × 2 seeds, 128px" in evaluated.stdout
    # a random tiny model is nowhere near the recipe's SSIM > 0.75: refused on the threshold
    # although the margin would let anything beat the base
    assert f"gate: NOT PROMOTED {adapter.tag}" in evaluated.stdout
    assert "MISSES the threshold > 0.75" in evaluated.stdout
    record = json.loads((out / "results.json").read_text())
    assert record["gate"]["limits"] == {
        "fid_clip": "< 40",
        "ssim": "> 0.75",
        "lpips_clip": "< 0.25",
    }
    assert record["reference_images"] == 2
    assert STAGE_LABEL not in get_entry(adapter.tag).labels
