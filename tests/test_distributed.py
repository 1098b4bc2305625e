"""Data-parallel training through `accelerate launch`, two CPU processes: one adapter, and the
same training as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from models.adapter import get_adapter, list_adapters
from tests.train_helpers import train_cmd
from train.cli import config_from_args
from train.loop import train

pytestmark = pytest.mark.slow

LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
"""accelerate's multi-process launcher (torchrun); add --num_processes N, then -m train ..."""
CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
"""CPU processes joined by gloo (`--cpu` would pick the single-process launcher instead), one
thread each: with two threads per process on two cores a step took 40 times longer."""


def launch_cmd(sample_dir, tmp_path, name: str) -> list[str]:
    return [
        *LAUNCH,
        "--num_processes",
        "2",
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
    cmd = launch_cmd(sample_dir, tmp_path, "ddp")
    result = subprocess.run(cmd, capture_output=True, text=True, env=CPU_ENV, timeout=600)
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


# --- two processes train exactly as one


STEPS = 4


def run_split(sample_dir, tmp_path, name: str, processes: int, batch: int, accum: int):
    """Train STEPS steps with `processes` × `batch` × `accum` examples a step; returns the final
    LoRA weights and the logged losses. Dropout, flips, offset noise and min-SNR are on, so every
    kind of per-example randomness is exercised."""
    args = train_cmd(
        sample_dir, tmp_path, name,
        "--batch-size", str(batch), "--gradient-accumulation-steps", str(accum),
        "--max-steps", str(STEPS), "--checkpoint-every", "0", "--no-store",
        "--noise-offset", "0.05", "--snr-gamma", "5",
    )[1:]  # fmt: skip
    if processes == 1:  # in this process: `python -m train` without the launcher
        train(config_from_args(args[2:]))
    else:  # the same `-m train ...` under the launcher
        cmd = [*LAUNCH, "--num_processes", str(processes), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, env=CPU_ENV, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / name
    weights = load_file(run_dir / "final" / "pytorch_lora_weights.safetensors")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"], r["grad_norm"]) for r in lines if "loss" in r]
    return weights, losses


def assert_same_training(got, want):
    (weights, losses), (want_weights, want_losses) = got, want
    assert [s for s, _, _ in losses] == list(range(1, STEPS + 1))
    assert len(losses) == len(want_losses)
    for (step, loss, norm), (_, want_loss, want_norm) in zip(losses, want_losses, strict=True):
        assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6), step
        assert norm == pytest.approx(want_norm, rel=1e-5, abs=1e-6), step
    assert weights.keys() == want_weights.keys()
    moved = 0.0
    for key, tensor in weights.items():
        assert (tensor - want_weights[key]).abs().max() <= 1e-5, key
        moved = max(moved, float(tensor.abs().max()))
    assert moved > 0


def test_two_processes_equal_one_on_the_same_global_batch(tiny_base, sample_dir, tmp_path):
    one = run_split(sample_dir, tmp_path, "one-4x1", processes=1, batch=4, accum=1)
    two = run_split(sample_dir, tmp_path, "two-2x2", processes=2, batch=2, accum=1)
    assert_same_training(two, one)
    # with accumulation: 2 processes × batch 1 × 2 micro-batches, and 1 × batch 2 × 2
    assert_same_training(
        run_split(sample_dir, tmp_path, "two-1x2x2", processes=2, batch=1, accum=2), one
    )
    assert_same_training(
        run_split(sample_dir, tmp_path, "one-2x2", processes=1, batch=2, accum=2), one
    )
    # and the loss curve is a real one: a different global batch trains differently
    other = run_split(sample_dir, tmp_path, "one-2x1", processes=1, batch=2, accum=1)
    assert [loss for _, loss, _ in other[1]] != pytest.approx([loss for _, loss, _ in one[1]])
