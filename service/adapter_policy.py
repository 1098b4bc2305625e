"""What an admin keeps out of serving: denied adapters (persisted) and unloaded ones (this process).

- **Denied** (POST /adapters/deny): a name, or one version of it, refused from then on with the
  reason "denied by an admin". The deny list is a JSON file in the store's folder
  (`$BENTOML_HOME/models/bentolora-denied.json`; BentoML lists only folders there), so it survives
  restarts and every replica that mounts the same store volume reads the same list; each change
  is a read-modify-write under a lock file beside it (flock, which NFSv4 honours), then one
  atomic rename. Lifted by POST /adapters/allow (or by editing the file: the
  store watcher notices). A deny list that cannot be read stops re-selection (logged) rather
  than serve what it may deny.
- **Unloaded** (POST /adapters/unload): the versions of a name in the store at that moment stop
  being served by this server process; a version saved later is served as usual. Kept in memory:
  a restart or POST /adapters/allow lifts it. Other replicas are not told (deny is the
  deployment-wide switch).

`AdapterPolicy.blocks()` gives an immutable `Blocks` whose `why(entry)` is what
`service.adapter_selection.select_adapters` takes as `blocked`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from models.store import StoreEntry, store_root

log = logging.getLogger(__name__)

DENY_FILE = "bentolora-denied.json"
ALL = "*"
"""In the deny file: every version of the name."""
DENIED = "denied by an admin"
UNLOADED = "unloaded by an admin (a version saved later, POST /adapters/allow or a restart serves it again)"


class DenyListError(RuntimeError):
    """The deny file exists but cannot be read as a deny list."""


def deny_file() -> Path:
    """The deny list of the store this process uses: `$BENTOML_HOME/models/bentolora-denied.json`."""
    return store_root() / DENY_FILE


@dataclass(frozen=True)
class Blocks:
    """The deny list and the unloaded versions at one moment."""

    denied: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Adapter name (without `lora-`) -> denied versions, or {"*"} for all of them."""
    unloaded: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Adapter name -> versions unloaded in this process."""

    def why(self, entry: StoreEntry) -> str:
        """Why `entry` is kept out ("" when it is not)."""
        name = entry.name.removeprefix("lora-")
        versions = self.denied.get(name, frozenset())
        if ALL in versions:
            return DENIED
        if entry.version in versions:
            return f"version {entry.version} {DENIED}"
        if entry.version in self.unloaded.get(name, frozenset()):
            return UNLOADED
        return ""

    def __bool__(self) -> bool:
        return bool(self.denied or self.unloaded)


class AdapterPolicy:
    """The deny file at `path` and this process's unloads; safe to use from several threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._unloaded: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()
        self._writing = threading.Lock()

    def blocks(self) -> Blocks:
        """What is kept out now (the deny file read afresh). Raises DenyListError."""
        with self._lock:
            return Blocks(denied=self._read(), unloaded=MappingProxyType(dict(self._unloaded)))

    def denied(self) -> dict[str, list[str]]:
        """The deny list as stored: name -> versions (["*"]: all)."""
        return {name: sorted(versions) for name, versions in self._read().items()}

    def deny(self, name: str, version: str | None = None) -> None:
        """Deny `name` (all its versions, those saved later too) or one `version` of it."""

        def change(denied: dict[str, set[str]]) -> None:
            versions = denied.setdefault(name, set())
            if version is None or ALL in versions:
                versions.clear()
                versions.add(ALL)
            else:
                versions.add(version)

        self._update(change)
        log.warning("adapter %s%s denied by an admin", name, f":{version}" if version else "")

    def unload(self, name: str, versions: Iterable[str]) -> None:
        """Stop serving `versions` of `name` in this process."""
        with self._lock:
            self._unloaded[name] = self._unloaded.get(name, frozenset()) | frozenset(versions)
        log.warning("adapter %s unloaded by an admin", name)

    def allow(self, name: str, version: str | None = None) -> str:
        """Lift the deny (of `version` only, when given) and, without a version, the unload of
        `name`. Returns what was lifted ("" when nothing was)."""
        lifted = []

        def change(denied: dict[str, set[str]]) -> None:
            versions = denied.get(name, set())
            if version is None and versions:
                lifted.append("denied")
                del denied[name]
            elif version is not None and version in versions:
                lifted.append(f"version {version} denied")
                versions.discard(version)
                if not versions:
                    del denied[name]

        if self._read().get(name):
            self._update(change)
        if version is None:
            with self._lock:
                if self._unloaded.pop(name, None) is not None:
                    lifted.append("unloaded")
        if lifted:
            log.warning("adapter %s allowed again (was %s)", name, " and ".join(lifted))
        return " and ".join(lifted)

    def _read(self) -> dict[str, frozenset[str]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise DenyListError(f"{self.path}: cannot be read ({err})") from err
        try:
            denied = json.loads(text)["denied"]
            return {
                str(name): frozenset(str(v) for v in versions) for name, versions in denied.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DenyListError(
                f'{self.path}: not a deny list ({{"denied": {{"name": ["*" or versions]}}}}): {err}'
            ) from err

    def _update(self, change) -> None:
        """Read, `change` and write the deny file atomically, under its lock (replicas sharing
        the store may write it at the same moment)."""
        with self._file_lock():
            denied = {name: set(versions) for name, versions in self._read().items()}
            change(denied)
            body = {"denied": {name: sorted(v) for name, v in sorted(denied.items())}}
            fd, scratch = tempfile.mkstemp(prefix=f".{DENY_FILE}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(body, f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(scratch, self.path)
            except BaseException:
                Path(scratch).unlink(missing_ok=True)
                raise

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """This process's writers one at a time, and other processes' through a lock file."""
        with self._writing:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(f".{self.path.name}.lock"), "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
