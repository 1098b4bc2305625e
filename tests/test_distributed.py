"""Data-parallel training through `accelerate launch`, two CPU processes, one adapter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models.adapter import get_adapter, list_adapters

pytestmark = pytest.mark.slow


def test_two_process_accelerate_launch_trains_one_adapter(tiny_base, sample_dir, tmp_path):
    before = {e.tag for e in list_adapters()}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "train",
        "--base",
        "sdxl-tiny",
        "--data-dir",
        str(sample_dir),
        "--name",
        "ddp",
        "--output-dir",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--resolution",
        "64",
        "--rank",
        "4",
        "--batch-size",
        "2",
        "--max-steps",
        "6",
        "--checkpoint-every",
        "3",
        "--no-tensorboard",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    new = [e for e in list_adapters() if e.tag not in before]
    assert [e.name for e in new] == ["lora-ddp"]  # one adapter, written by the main process only
    meta = get_adapter("ddp").metadata
    assert meta["steps"] == 6 and meta["processes"] == 2
    assert result.stdout.count("adapter: lora-ddp:") == 1
