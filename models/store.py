"""Reads and writes of the BentoML model store: bases (`sdxl-*`) and adapters (`lora-*`).

Every write is atomic: the entry is built in a staging folder on the store's file system and
renamed into place, then `latest` is repointed by another rename. A crash at any instant leaves
either no new version or a complete one, and `latest` never names a partial entry.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attr
import bentoml
from bentoml._internal.models.model import MODEL_YAML_FILENAME, Model, ModelContext, ModelInfo
from bentoml.exceptions import NotFound

from models.hashing import hash_folder

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "lora-"
KIND_LABEL = "bentolora.kind"
BASE_LABEL = "bentolora.base"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""Errors that mean the store's disk (or the user's quota on it) is full."""

NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")
NAME_RULE = (
    "1-64 characters of a-z, 0-9, '.', '_' or '-', starting and ending with a letter or digit"
)


class StoreError(LookupError):
    """A store entry is missing, of the wrong kind, or cannot be written."""


@dataclass(frozen=True)
class StoreEntry:
    """One version of a base or adapter in the model store."""

    tag: str
    path: Path
    labels: dict[str, str]
    metadata: dict[str, Any]

    @property
    def name(self) -> str:
        return self.tag.split(":", 1)[0]

    @property
    def version(self) -> str:
        return self.tag.split(":", 1)[1]


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a valid store name, else raise naming the rule."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise StoreError(f"{what} {name!r} is not allowed: use {NAME_RULE}")
    return name


def adapter_store_name(name: str) -> str:
    """`style` -> `lora-style`; a name that already has the prefix is kept."""
    name = name.split(":", 1)[0]
    return name if name.startswith(ADAPTER_PREFIX) else ADAPTER_PREFIX + name


def _model_store():
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.model_store.get()


def store_root() -> Path:
    """The folder the model store lives in (`$BENTOML_HOME/models`)."""
    return Path(_model_store()._path)


def _entry(model: bentoml.Model) -> StoreEntry:
    info = model.info
    return StoreEntry(
        tag=str(model.tag),
        path=Path(model.path),
        labels=dict(info.labels),
        metadata=dict(info.metadata),
    )


def get_entry(tag: str, kind: str | None = None) -> StoreEntry:
    """Find a store entry by `name` (latest version) or `name:version`."""
    try:
        model = bentoml.models.get(tag)
    except (NotFound, ValueError) as err:
        names = sorted({str(m.tag.name) for m in bentoml.models.list()})
        raise StoreError(
            f"{tag!r} is not in the model store at {store_root()}; present: {', '.join(names) or 'nothing'}"
        ) from err
    entry = _entry(model)
    if kind is not None and entry.labels.get(KIND_LABEL) != kind:
        raise StoreError(
            f"{entry.tag} is a {entry.labels.get(KIND_LABEL, 'foreign model')}, not a {kind}"
        )
    return entry


def list_entries(kind: str | None = None) -> list[StoreEntry]:
    """All versions in the store, newest first, optionally of one kind (`base` or `adapter`)."""
    entries = [_entry(m) for m in bentoml.models.list()]
    if kind is not None:
        entries = [e for e in entries if e.labels.get(KIND_LABEL) == kind]
    by_time = {str(m.tag): m.info.creation_time for m in bentoml.models.list()}
    return sorted(entries, key=lambda e: by_time[e.tag], reverse=True)


_held_locks: dict[str, int] = {}
"""Names this process holds the entry lock of, with the nesting depth (flock is not reentrant)."""


def _staging_root() -> Path:
    return store_root().parent / ".bentolora-staging"


@contextmanager
def entry_lock(name: str) -> Iterator[None]:
    """Hold the lock of store name `name` (all its versions) across processes; reentrant.

    A read-modify-write of labels (a promotion archives one version and promotes another) must
    not interleave with another process doing the same.
    """
    if _held_locks.get(name):
        _held_locks[name] += 1
        try:
            yield
        finally:
            _held_locks[name] -= 1
        return
    locks = store_root().parent / ".bentolora-locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _held_locks[name] = 1
        try:
            yield
        finally:
            _held_locks.pop(name, None)
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_entry(
    tag: str,
    *,
    metadata: dict[str, Any] | None = None,
    labels: dict[str, str | None] | None = None,
) -> StoreEntry:
    """Merge `metadata` and `labels` into an existing version's `model.yaml`, atomically.

    Top-level keys are replaced; a label set to None is removed. The new `model.yaml` is written
    beside the store (same file system) and renamed over the old one, so a reader sees the old
    file or the new one, never a partial one. The weights are untouched, and the content hash
    ignores `model.yaml` (models.hashing.IGNORED), so adapter checks still pass.
    """
    entry = get_entry(tag)
    with entry_lock(entry.name):
        info = bentoml.models.get(entry.tag).info  # read again under the lock
        new_labels = {**info.labels, **(labels or {})}
        updated = ModelInfo(
            tag=info.tag,
            module=info.module,
            labels={k: v for k, v in new_labels.items() if v is not None},
            options=info._options,
            metadata={**info.metadata, **(metadata or {})},
            context=info.context,
            signatures=info.signatures,
            api_version=info.api_version,
            creation_time=info.creation_time,
        )
        staging = _staging_root()
        staging.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f"{entry.name}-", suffix=".yaml", dir=staging)
        try:
            with os.fdopen(handle, "w") as f:
                updated.dump(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, entry.path / MODEL_YAML_FILENAME)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if _disk_full(err):
                raise StoreError(
                    f"cannot update {entry.tag}: no space left on the disk holding the model "
                    f"store ({_free(entry.path)} free); it is unchanged"
                ) from err
            raise
    log.info("updated %s (%s)", entry.tag, ", ".join([*(metadata or {}), *(labels or {})]))
    return get_entry(entry.tag)


@dataclass
class Staged:
    """A store entry being written: fill `path`, add to `metadata`, before the block ends."""

    path: Path
    metadata: dict[str, Any]
    tag: str = ""
    """Set once the entry is published."""


@contextmanager
def create_entry(
    name: str,
    *,
    kind: str,
    labels: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
    reuse_identical: bool = False,
) -> Iterator[Staged]:
    """Yield an empty folder to fill; on a clean exit it becomes a new version, atomically.

    The folder is staged beside the store (same file system), so publishing is one rename, and
    on an exception (or a kill) nothing reaches the store. `bentoml models list` reads the result
    like any other model: the `model.yaml` is BentoML's own, written by its `Model` class.
    The content hash of the files goes into the metadata as `content_hash`; with
    `reuse_identical`, a version of `name` holding the same files is kept instead of adding a twin
    (so setup commands can run every time), and `staged.tag` names it.
    A full disk raises StoreError saying so and where, after removing what was written.
    """
    check_name(name)
    root = store_root()
    staging_root = _staging_root()
    stage: Path | None = None
    published: Path | None = None
    try:
        staging_root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging_root))
        staged = Staged(stage, dict(metadata or {}))
        yield staged
        staged.metadata["content_hash"] = hash_folder(stage)
        if reuse_identical:
            for existing in list_entries(kind):
                if (
                    existing.name == name
                    and existing.metadata.get("content_hash") == staged.metadata["content_hash"]
                ):
                    shutil.rmtree(stage, ignore_errors=True)
                    staged.tag = existing.tag
                    log.info("%s already holds these files", existing.tag)
                    return
        model = Model.create(
            name,
            module="bentolora",
            api_version="v1",
            signatures={},
            labels={KIND_LABEL: kind, **(labels or {})},
            metadata=staged.metadata,
            context=ModelContext(framework_name="bentolora", framework_versions={}),
        )
        shutil.rmtree(model.path, ignore_errors=True)  # the empty temp folder it made
        model = attr.evolve(model, path=stage)
        model.flush()  # model.yaml: tag, labels, metadata, creation time
        model.validate()
        _fsync_tree(stage)
        final = root / model.tag.name / model.tag.version
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(stage, final)
        published = final
        _write_latest(final.parent, model.tag.version)
    except BaseException as err:
        # An exception means "nothing stored", even when it came after the rename (`latest`
        # could not be repointed): the new version goes too, so a retry starts clean.
        for leftover in (stage, published):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
        if _disk_full(err):
            raise StoreError(
                f"cannot write {name}: no space left on the disk holding the model store {root} "
                f"(ENOSPC; {_free(root)} free now); nothing was stored. Free space there and retry"
            ) from err
        raise
    log.info("saved %s", model.tag)
    staged.tag = str(model.tag)


def _disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, is the disk running out of space.

    Libraries wrap the OSError in their own types (safetensors raises "I/O error: No space left
    on device (os error 28)"), so the message is checked as well as `errno`.
    """
    texts = [os.strerror(code) for code in DISK_FULL]
    while err is not None:
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return True
        if any(text in str(err) for text in texts):
            return True
        err = err.__cause__ or err.__context__
    return False


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown"


def _write_latest(name_dir: Path, version: str) -> None:
    tmp = name_dir / f".latest.{os.getpid()}"
    try:
        tmp.write_text(version)
        os.replace(tmp, name_dir / "latest")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
