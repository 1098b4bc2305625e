"""Kill a training run at a random step, resume from the latest checkpoint, get the same adapter."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
import torch

from models.adapter import get_adapter, list_adapters, load_adapter_weights, weights_path
from tests.train_helpers import STEPS, last_logged_step, logged_loss_steps, train_cmd
from train.checkpoint import find_latest, is_valid

pytestmark = pytest.mark.slow


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tiny_base, sample_dir, tmp_path):
    env = dict(os.environ)
    subprocess.run(
        train_cmd(sample_dir, tmp_path, "straight"), check=True, env=env, capture_output=True
    )
    expected = load_adapter_weights(weights_path(get_adapter("straight")))

    kill_at = random.Random().randint(5, STEPS - 3)
    run_dir = tmp_path / "runs" / "interrupted"
    proc = subprocess.Popen(
        train_cmd(sample_dir, tmp_path, "interrupted"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while last_logged_step(run_dir) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert all(e.name != "lora-interrupted" for e in list_adapters())  # nothing half-stored
    latest = find_latest(run_dir)
    assert latest is not None and is_valid(latest)
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(checkpoints) <= 2  # keep_checkpoints

    resumed = subprocess.run(
        train_cmd(sample_dir, tmp_path, "interrupted", "--resume", "latest"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "adapter: lora-interrupted:" in resumed.stdout
    # No step logged twice across the kill.
    assert logged_loss_steps(run_dir) == list(range(1, STEPS + 1))
    got = load_adapter_weights(weights_path(get_adapter("interrupted")))
    assert got.keys() == expected.keys()
    for key in expected:
        # Same batches, noise, dropout masks and optimizer state: on one CPU the arithmetic is
        # the same, so the result is bit-identical.
        assert torch.equal(got[key], expected[key]), key


def test_resume_refuses_a_checkpoint_from_other_settings(tiny_base, sample_dir, tmp_path):
    env = dict(os.environ)
    cmd = train_cmd(sample_dir, tmp_path, "other", "--no-store")
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    changed = subprocess.run(
        cmd + ["--rank", "8", "--resume", "latest"], env=env, capture_output=True, text=True
    )
    assert changed.returncode == 1
    assert "other settings" in changed.stderr


def test_resume_latest_without_checkpoints_says_so(tiny_base, sample_dir, tmp_path):
    result = subprocess.run(
        train_cmd(sample_dir, tmp_path, "never", "--resume", "latest"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "no valid checkpoint" in result.stderr
