"""Content hashes of folders and tensors, so an adapter can name exactly the base it was made for."""

from __future__ import annotations

import hashlib
from pathlib import Path

IGNORED = {"model.yaml", "custom_objects.pkl"}
"""BentoML's own bookkeeping files: they change with every save, the weights do not."""


def hash_file(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_folder(root: str | Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in IGNORED):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
