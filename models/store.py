"""Reads and writes of the BentoML model store: bases (`sdxl-*`) and adapters (`lora-*`).

Every write is atomic: the entry is built in a staging folder on the store's file system and
renamed into place, then `latest` is repointed by another rename. A crash at any instant leaves
either no new version or a complete one, and `latest` never names a partial entry.

Reads go through BentoML's public API (`bentoml.models.get`, `list`). Writes cannot: the public
`bentoml.models.create` stages in the system's temp folder and copies into the store folder in
place, so a kill midway leaves a half version in the store (tests/test_bentoml_internals.py shows
it), and BentoML has no public way to change a stored version's labels or metadata. What the
writes rely on instead is pinned, each with a test naming it, in tests/test_bentoml_internals.py:
`bentoml.Model.create` and `Model.info.dump` make BentoML's own tag and `model.yaml`; the store
layout (`$BENTOML_HOME/models/<name>/<version>/model.yaml`, `<name>/latest`); and `model.yaml`'s
top-level `labels` and `metadata`, which `update_entry` edits.
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

import bentoml
import yaml
from bentoml.exceptions import BentoMLException, NotFound

from models.hashing import hash_folder

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "lora-"
KIND_LABEL = "bentolora.kind"
BASE_LABEL = "bentolora.base"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""Errors that mean the store's disk (or the user's quota on it) is full."""

MODEL_YAML = "model.yaml"
"""BentoML's description of a version (tag, labels, metadata, creation time), in its folder."""
MODULE = "bentolora"
"""What `bentoml models list` shows as the module of our entries."""

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


def store_root() -> Path:
    """The folder the model store lives in: `$BENTOML_HOME/models`, `~/bentoml/models` by
    default, as BentoML documents it (variables and `~` in BENTOML_HOME expanded as BentoML
    does). create_entry checks that BentoML finds each entry written here."""
    home = os.environ.get("BENTOML_HOME", os.path.join("~", "bentoml"))
    while (expanded := os.path.expanduser(os.path.expandvars(home))) != home:
        home = expanded
    return Path(home) / "models"


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
    models = sorted(bentoml.models.list(), key=lambda m: m.info.creation_time, reverse=True)
    entries = [_entry(m) for m in models]
    if kind is not None:
        entries = [e for e in entries if e.labels.get(KIND_LABEL) == kind]
    return entries


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

    Top-level keys are replaced; a label set to None is removed. BentoML has no public call for
    this, so its `model.yaml` is edited as data: only `labels` and `metadata` change, every other
    field stays as BentoML wrote it. The new file is written beside the store (same file system),
    read back with BentoML's own reader (`bentoml.Model.from_path`), and renamed over the old one,
    so a reader sees the old file or the new one, never a partial or unreadable one. The weights
    are untouched, and the content hash ignores `model.yaml` (models.hashing.IGNORED), so adapter
    checks still pass.
    """
    entry = get_entry(tag)
    for key, value in (labels or {}).items():
        if not isinstance(key, str) or not isinstance(value, str | None):
            raise StoreError(f"label {key!r}: {value!r}: labels are text (None removes one)")
    with entry_lock(entry.name):
        info = yaml.safe_load((entry.path / MODEL_YAML).read_text("utf8"))  # again, locked
        new_labels = {**(info.get("labels") or {}), **(labels or {})}
        info["labels"] = {k: v for k, v in new_labels.items() if v is not None}
        info["metadata"] = {**(info.get("metadata") or {}), **_plain(metadata or {})}
        staging = _staging_root()
        staging.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{entry.name}-", dir=staging))
        try:
            with open(scratch / MODEL_YAML, "w", encoding="utf8") as f:
                yaml.safe_dump(info, f, sort_keys=False)
                f.flush()
                os.fsync(f.fileno())
            _readable_by_bentoml(scratch, entry.tag)
            os.replace(scratch / MODEL_YAML, entry.path / MODEL_YAML)
        except BaseException as err:
            if _disk_full(err):
                raise StoreError(
                    f"cannot update {entry.tag}: no space left on the disk holding the model "
                    f"store ({_free(entry.path)} free); it is unchanged"
                ) from err
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("updated %s (%s)", entry.tag, ", ".join([*(metadata or {}), *(labels or {})]))
    return get_entry(entry.tag)


def _plain(value: Any) -> Any:
    """`value` in the plain types a YAML file holds: numpy and torch numbers and arrays become
    Python numbers and lists, tuples lists (BentoML's own writer converts them the same way)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value


def _readable_by_bentoml(folder: Path, tag: str) -> None:
    """Raise StoreError unless BentoML reads `folder`'s model.yaml as version `tag`."""
    try:
        model = bentoml.Model.from_path(folder)
    except Exception as err:  # whatever BentoML's reader raises, the file is not publishable
        raise StoreError(f"BentoML cannot read the model.yaml written for {tag}: {err}") from err
    if str(model.tag) != tag:
        raise StoreError(f"BentoML reads the model.yaml written for {tag} as {model.tag}")


def _new_version(name: str, folder: Path, labels: dict[str, str], metadata: dict) -> str:
    """Write BentoML's model.yaml for a new version of `name` into `folder`; return its tag.

    `bentoml.Model.create` makes the tag and the description as the public `bentoml.models.create`
    would (it is what that calls), without saving anything into the store; the public call would
    then copy the files into the store in place, which a kill can leave half done.
    """
    model = bentoml.Model.create(
        name,
        module=MODULE,
        api_version="v1",
        signatures={},
        labels=labels,
        metadata=metadata,
        context=bentoml.models.ModelContext(framework_name=MODULE, framework_versions={}),
    )
    try:
        with open(folder / MODEL_YAML, "w", encoding="utf8") as f:
            model.info.dump(f)
    finally:
        shutil.rmtree(model.path, ignore_errors=True)  # the empty temp folder it made
    tag = str(model.tag)
    _readable_by_bentoml(folder, tag)
    return tag


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
    like any other model: the `model.yaml` is BentoML's own, written by its `Model` class, and
    BentoML is asked for the new version once it is in place.
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
        tag = _new_version(name, stage, {KIND_LABEL: kind, **(labels or {})}, staged.metadata)
        version = tag.split(":", 1)[1]
        _fsync_tree(stage)
        final = root / name / version
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(stage, final)
        published = final
        _found_by_bentoml(tag, final)
        _write_latest(final.parent, version)
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
    log.info("saved %s", tag)
    staged.tag = tag


def _found_by_bentoml(tag: str, folder: Path) -> None:
    """Raise StoreError unless BentoML's public lookup finds `tag` in `folder`: the store written
    to is the one BentoML reads."""
    try:
        found = Path(bentoml.models.get(tag).path)
    except (NotFound, BentoMLException) as err:
        raise StoreError(f"BentoML does not find {tag}, written to {folder}: {err}") from err
    if found.resolve() != folder.resolve():
        raise StoreError(f"BentoML finds {tag} in {found}, not in {folder} where it was written")


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
