"""Which adapter versions in the store a server serves, and why it refuses the others."""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from diffusers import StableDiffusionXLPipeline

from models.adapter import AdapterError, list_adapters, verify_adapter, weights_path
from models.lora_files import BaseLayers
from models.lora_fusion import check_mergeable
from models.stages import is_production
from models.store import StoreEntry
from service.settings import Settings

Blocked = Callable[[StoreEntry], str]
"""Why an admin keeps this version out (denied, unloaded: see service.adapter_policy); "" if not."""

log = logging.getLogger(__name__)


class StoreAdapters(NamedTuple):
    served: dict[str, StoreEntry]
    """Adapter name (without `lora-`) -> the version to serve."""
    refused: dict[str, str]
    """Name -> why its versions for this base were refused."""
    foreign: dict[str, str]
    """Name -> the other base its versions were made for."""


RECENT_NS = 2 * 10**9
"""Files modified this recently (ns) when checked get checked again at the next selection."""


class CheckedVersions:
    """Each adapter version's check outcome ("" passed, else why it was refused), with the size,
    modification time and inode of every file it was read from. A re-selection then hashes and
    loads only the versions whose files changed since (with many adapters in the store, every
    save would otherwise re-read them all); the server's base and settings never change, so an
    outcome holds while the files do. The store watcher owns one."""

    def __init__(self) -> None:
        self._outcomes: dict[str, tuple[tuple, str]] = {}

    def why_refused(self, entry: StoreEntry, check: Callable[[StoreEntry], None]) -> str:
        checked_at = time.time_ns()
        stamp = files_stamp(entry.path)
        known = self._outcomes.get(entry.tag)
        if known is not None and known[0] == stamp:
            return known[1]
        try:
            check(entry)
            why = ""
        except AdapterError as err:
            log.warning("refusing adapter %s: %s", entry.tag, err)
            why = str(err)
        # A file modified within RECENT_NS of its stamp may change again without its stamp
        # changing (a coarse clock, same size): such an outcome is not kept (as git's index
        # treats "racily clean" files).
        newest = max((s[2] for s in stamp if s[2] is not None), default=0)
        if newest < checked_at - RECENT_NS:
            self._outcomes[entry.tag] = (stamp, why)
        else:
            self._outcomes.pop(entry.tag, None)
        return why

    def keep_only(self, tags: set[str]) -> None:
        """Forget the versions no longer in the store."""
        for tag in self._outcomes.keys() - tags:
            del self._outcomes[tag]


def files_stamp(folder: Path) -> tuple:
    """(relative path, size, modification time, inode) of every file under `folder`: stat
    only, no file read. Rewriting a file, or replacing it by a rename, changes it."""
    stamps = []
    for path in sorted(folder.rglob("*")):
        try:
            st = path.stat()
        except OSError:  # deleted meanwhile, or a dangling link: the check will say
            stamps.append((str(path.relative_to(folder)), None, None, None))
            continue
        if stat.S_ISREG(st.st_mode):
            stamps.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(stamps)


def select_adapters(
    pipe: StableDiffusionXLPipeline | BaseLayers,
    base: StoreEntry,
    settings: Settings,
    blocked: Blocked | None = None,
    checked: CheckedVersions | None = None,
) -> StoreAdapters:
    """Read the store: per adapter name, the newest version made for `base` that passes every
    check (verify_adapter); versions that fail are listed as refused, with why. With
    BENTOLORA_PROMOTED_ONLY only versions labelled stage=production count; a name with no such
    version is refused as not promoted. A version `blocked` names a reason for (an admin's deny
    or unload) is refused with that reason, before any check reads its files. With `checked`,
    a version whose files are unchanged since its last check keeps that check's outcome.

    `pipe` is the serving pipeline or the base's layers on the meta device
    (`models.lora_exchange.base_layers`): only layer names and shapes are read."""
    served, foreign, refused = {}, {}, {}
    checked = checked if checked is not None else CheckedVersions()
    entries = list_adapters()  # newest first
    promoted = {e.name.removeprefix("lora-") for e in entries if is_production(e)}

    def check(entry: StoreEntry) -> None:
        verify_adapter(entry, pipe, base, max_bytes=settings.max_adapter_bytes)
        if settings.lora_mode == "fused":
            check_mergeable(weights_path(entry), tag=entry.tag)

    for entry in entries:
        name = entry.name.removeprefix("lora-")
        if name in served:
            continue
        if entry.metadata.get("base_hash") != base.metadata["content_hash"]:
            foreign.setdefault(name, entry.metadata.get("base_tag", "?"))
            continue
        why = blocked(entry) if blocked is not None else ""
        if why:
            refused.setdefault(name, why)
            continue
        if settings.promoted_only and not is_production(entry):
            if name not in promoted:
                refused.setdefault(name, "not promoted (BENTOLORA_PROMOTED_ONLY)")
            continue
        why = checked.why_refused(entry, check)
        if why:
            refused.setdefault(name, why)
            continue
        served[name] = entry
    checked.keep_only({entry.tag for entry in entries})
    return StoreAdapters(
        served=served,
        refused={k: v for k, v in refused.items() if k not in served},
        foreign={k: v for k, v in foreign.items() if k not in served and k not in refused},
    )
