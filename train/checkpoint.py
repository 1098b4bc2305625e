"""Resumable training checkpoints: LoRA tensors, optimizer and schedule state, step, checksums.

A checkpoint is written into a hidden temporary folder and renamed into place, so a kill during
the write leaves the previous checkpoints intact; `latest` is the newest folder whose checksums
verify.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models import failpoints
from models.hashing import hash_file

log = logging.getLogger(__name__)

PREFIX = "step-"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    state: dict[str, Any]
    path: Path


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    lr_scheduler: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in trainable.items()}, tmp / "lora.safetensors")
    failpoints.hit("checkpoint.write")  # a crash mid-write, for the tests
    torch.save({"optimizer": optimizer, "lr_scheduler": lr_scheduler}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    sums = {f.name: hash_file(f) for f in sorted(tmp.iterdir())}
    (tmp / "checksums.json").write_text(json.dumps(sums, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _prune(root, keep)
    log.info("checkpoint %s", final)
    return final


def _prune(root: Path, keep: int) -> None:
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def is_valid(folder: Path) -> bool:
    """True when every file listed in checksums.json is present with the recorded hash."""
    try:
        sums = json.loads((folder / "checksums.json").read_text())
        return bool(sums) and all(
            hash_file(folder / name) == digest for name, digest in sums.items()
        )
    except (OSError, ValueError):
        return False


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies, skipping damaged ones (with a warning)."""
    for folder in sorted(checkpoints_dir(run_dir).glob(f"{PREFIX}*"), reverse=True):
        if is_valid(folder):
            return folder
        log.warning("skipping damaged checkpoint %s", folder)
    return None


def resolve_resume(run_dir: str | Path, resume: str) -> Path:
    """`latest` or a folder -> a verified checkpoint folder, or CheckpointError saying why not."""
    if resume == "latest":
        found = find_latest(run_dir)
        if found is None:
            raise CheckpointError(
                f"--resume latest: no valid checkpoint in {checkpoints_dir(run_dir)}"
            )
        return found
    folder = Path(resume)
    if not is_valid(folder):
        raise CheckpointError(
            f"--resume {resume}: not a complete checkpoint folder (checksums fail)"
        )
    return folder


def load_checkpoint(folder: Path) -> Checkpoint:
    state = json.loads((folder / "state.json").read_text())
    opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return Checkpoint(
        step=int(state["step"]),
        trainable=load_file(folder / "lora.safetensors"),
        optimizer=opt["optimizer"],
        lr_scheduler=opt["lr_scheduler"],
        state=state,
        path=folder,
    )
