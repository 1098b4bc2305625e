"""Data-parallel training through `accelerate launch`, two CPU processes, one adapter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models.adapter import get_adapter, list_adapters

pytestmark = pytest.mark.slow


def launch_cmd(sample_dir, tmp_path, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
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
        name,
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


def test_two_process_accelerate_launch_trains_one_adapter(tiny_base, sample_dir, tmp_path):
    before = {e.tag for e in list_adapters()}
    # accelerate's multi-process launcher (torchrun) on a machine without GPUs: CPU processes
    # joined by gloo. `--cpu` would pick the single-process launcher instead.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    cmd = launch_cmd(sample_dir, tmp_path, "ddp")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    new = [e for e in list_adapters() if e.tag not in before]
    assert [e.name for e in new] == ["lora-ddp"]  # one adapter, written by the main process only
    meta = get_adapter("ddp").metadata
    assert meta["steps"] == 6 and meta["processes"] == 2
    assert result.stdout.count("adapter: lora-ddp:") == 1


def test_processes_that_do_not_form_a_group_are_stopped(tiny_base, sample_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    result = subprocess.run(
        launch_cmd(sample_dir, tmp_path, "lonely"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode != 0
    assert "did not form a group" in result.stderr
    assert all(e.name != "lora-lonely" for e in list_adapters())
