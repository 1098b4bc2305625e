"""Training under crashes and divergence: a kill mid-checkpoint loses nothing that resuming needs,
damaged checkpoints are never resumed from, and weights gone non-finite stop the run by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch

from models import failpoints
from models.adapter import get_adapter, list_adapters, load_adapter_weights, weights_path
from tests.train_helpers import STEPS, logged_loss_steps, train_cmd
from train.checkpoint import (
    CheckpointError,
    find_latest,
    is_valid,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from train.config import TrainConfig
from train.loop import TrainingError, check_weights_finite, train


@pytest.mark.slow
def test_kill_mid_checkpoint_write_resumes_from_the_newest_valid_one(
    tiny_base, sample_dir, tmp_path
):
    straight = subprocess.run(
        train_cmd(sample_dir, tmp_path, "ckpt-straight"), capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = load_adapter_weights(weights_path(get_adapter("ckpt-straight")))

    # SIGKILL on the second checkpoint (step 8), after its lora.safetensors is written.
    run_dir = tmp_path / "runs" / "ckpt-killed"
    killed = subprocess.run(
        train_cmd(sample_dir, tmp_path, "ckpt-killed"),
        env={**os.environ, failpoints.ENV: "checkpoint.write=kill@2"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    (half,) = checkpoints.glob(".tmp-step-00000008-*")
    assert (half / "lora.safetensors").is_file() and not is_valid(half)
    assert [p.name for p in checkpoints.glob("step-*")] == ["step-00000004"]
    assert find_latest(run_dir) == checkpoints / "step-00000004"
    assert all(e.name != "lora-ckpt-killed" for e in list_adapters())

    resumed = subprocess.run(
        train_cmd(sample_dir, tmp_path, "ckpt-killed", "--resume", "latest"),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoints / 'step-00000004'} at step 4" in resumed.stderr
    assert logged_loss_steps(run_dir) == list(range(1, STEPS + 1))
    assert not list(checkpoints.glob(".tmp-*"))  # the next checkpoint cleared the debris
    got = load_adapter_weights(weights_path(get_adapter("ckpt-killed")))
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-weights": lambda ckpt: truncate(ckpt / "lora.safetensors"),
    "flipped-byte-in-optimizer": lambda ckpt: flip_a_byte(ckpt / "optimizer.pt"),
    "missing-state": lambda ckpt: (ckpt / "state.json").unlink(),
    "garbled-checksums": lambda ckpt: (ckpt / "checksums.json").write_text("{not json"),
    "empty-checksums": lambda ckpt: (ckpt / "checksums.json").write_text(json.dumps({})),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_find_latest_skips_a_damaged_checkpoint(tmp_path, damage, caplog):
    for step in (4, 8):
        save_checkpoint(
            tmp_path,
            step,
            {"unet.layer.lora_A.weight": torch.full((4, 16), float(step))},
            {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
            {"last_epoch": step},
            {"config_fingerprint": "same"},
            keep=2,
        )
    older, newer = (
        tmp_path / "checkpoints" / "step-00000004",
        tmp_path / "checkpoints" / "step-00000008",
    )
    assert find_latest(tmp_path) == newer
    damage(newer)

    assert find_latest(tmp_path) == older
    assert f"skipping damaged checkpoint {newer}" in caplog.text
    assert resolve_resume(tmp_path, "latest") == older
    assert load_checkpoint(older).step == 4
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(newer))


def test_non_finite_weights_are_named_with_the_step():
    tensors = {
        "unet.a.lora_A.weight": torch.zeros(2, 4),
        "unet.b.lora_B.weight": torch.tensor([[0.5], [float("nan")]]),
    }
    with pytest.raises(
        TrainingError, match=r"^step 12: adapter weight unet\.b\.lora_B\.weight is not finite"
    ):
        check_weights_finite(tensors, 12)
    check_weights_finite({"unet.a.lora_A.weight": torch.ones(2, 4)}, 12)


@pytest.mark.slow
def test_weights_gone_non_finite_stop_the_run_before_checkpointing_them(
    tiny_base, sample_dir, tmp_path
):
    """Step 1's loss is finite, but its update overflows float32: weight decay of lr × 100 = 1e39."""
    config = TrainConfig(
        base="sdxl-tiny",
        data_dir=str(sample_dir),
        name="robust-inf-weights",
        output_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        resolution=64,
        rank=4,
        batch_size=2,
        learning_rate=1e37,
        weight_decay=100.0,
        max_steps=4,
        checkpoint_every=1,
        keep_checkpoints=2,
        tensorboard=False,
    )
    with pytest.raises(
        TrainingError, match=r"^step 1: adapter weight unet\.\S+lora_A\S+ is not finite"
    ):
        train(config)
    assert find_latest(config.run_dir()) is None  # the broken state was not checkpointed
    assert all(e.name != "lora-robust-inf-weights" for e in list_adapters())
