"""On-disk cache of per-example tensors (VAE latents, text embeddings), shared across runs.

The folder name is a hash of everything the tensors depend on (base weights, dataset bytes and
captions, preprocessing settings), so a changed base or dataset never reads stale entries, and a
second run on the same data skips the encoders entirely.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def cache_key(**parts: Any) -> str:
    """A short stable hash of JSON-serializable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class ExampleCache:
    """One safetensors file per example under `root/key/`; writes are atomic renames."""

    def __init__(self, root: str | Path, key: str, describe: dict[str, Any]):
        self.folder = Path(root) / key
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / "manifest.json"
        if not manifest.exists():
            _atomic_write_text(manifest, json.dumps(describe, indent=2, sort_keys=True))

    def path(self, index: int) -> Path:
        return self.folder / f"{index:07d}.safetensors"

    def read(self, index: int) -> dict[str, torch.Tensor] | None:
        """The tensors of example `index`, or None when absent or unreadable (then rebuilt)."""
        path = self.path(index)
        if not path.exists():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError):
            return None

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(index)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
