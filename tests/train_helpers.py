"""Training-CLI helpers shared by the resume and robustness tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = 24


def train_cmd(sample_dir: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    """`python -m train` on the tiny base: STEPS steps, a checkpoint every 4, the newest 2 kept.

    Later options in `extra` override earlier ones (argparse keeps the last).
    """
    return [
        sys.executable,
        "-m",
        "train",
        "--base",
        "sdxl-tiny",
        "--data-dir",
        str(sample_dir),
        "--name",
        name,
        "--output-dir",
        str(tmp / "runs"),
        "--cache-dir",
        str(tmp / "cache"),
        "--resolution",
        "64",
        "--rank",
        "4",
        "--alpha",
        "4",
        "--learning-rate",
        "1e-3",
        "--batch-size",
        "2",
        "--gradient-accumulation-steps",
        "2",
        "--max-steps",
        str(STEPS),
        "--lr-scheduler",
        "cosine",
        "--warmup-steps",
        "3",
        "--dropout",
        "0.1",
        "--flip",
        "--checkpoint-every",
        "4",
        "--keep-checkpoints",
        "2",
        "--no-tensorboard",
        *extra,
    ]


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [
        json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()
    ]
    return max(steps, default=0)


def logged_loss_steps(run_dir: Path) -> list[int]:
    """The steps that logged a training loss, in file order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]
