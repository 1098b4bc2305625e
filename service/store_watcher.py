"""The store watcher: a running server serves adapter versions saved to the store after it started.

Every `BENTOLORA_ADAPTER_WATCH_S` seconds (0: never) a thread of its own lists the store's adapter
folders (`store_signature`: each `lora-*` folder, its versions and their modification times, and
the deny file's) and, only when that listing changed, selects what to serve as a reload does
(`service.adapter_selection.select_adapters`, with the admin's deny list and unloads) and hands
it to the engine, which publishes it. The selection reads files and the base's layers on the meta
device, never the serving pipeline, so batches run on meanwhile; publishing takes the pipeline's
lock (after the batch running) to drop the loaded weights of versions an admin unloaded or
denied. An error is logged and the next look tries again; the listing it failed on is not
remembered, so nothing is missed.

The admin routes (service.admin_routes) and POST /adapters/reload re-select through `reload`,
so every path that changes what is served applies the same checks and the same deny list.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from models.lora_exchange import base_layers
from models.lora_files import BaseLayers
from models.store import ADAPTER_PREFIX, StoreEntry, store_root
from service.adapter_policy import AdapterPolicy
from service.adapter_selection import CheckedVersions, StoreAdapters, select_adapters
from service.settings import Settings
from service.state import ServedSnapshot, ServerState

log = logging.getLogger(__name__)

Signature = tuple
"""What `store_signature` returns: equal when nothing an adapter selection reads has changed."""


class Publisher(Protocol):
    """What the watcher needs of the engine (service.engine.Engine)."""

    base: StoreEntry
    state: ServerState

    def serve_adapters(
        self, found: StoreAdapters, forget: Iterable[str] = ()
    ) -> ServedSnapshot: ...


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def store_signature(root: Path, deny_file: Path) -> Signature:
    """The adapter folders under the store folder `root` (names, versions, modification times)
    and the deny file's time and size: one `scandir` per adapter name, no file read. A version
    saved, deleted or relabelled (a promotion rewrites its model.yaml by a rename) changes it."""
    adapters = []
    try:
        names = sorted(
            (e for e in os.scandir(root) if e.name.startswith(ADAPTER_PREFIX) and e.is_dir()),
            key=lambda e: e.name,
        )
    except FileNotFoundError:
        names = []
    for name in names:
        try:
            versions = sorted(
                (v.name, v.stat().st_mtime_ns) for v in os.scandir(name.path) if v.is_dir()
            )
            adapters.append((name.name, name.stat().st_mtime_ns, tuple(versions)))
        except FileNotFoundError:  # deleted while listed: the next look sees it gone
            adapters.append((name.name, None, ()))
    return tuple(adapters), _stat(deny_file)


class StoreWatcher:
    """Re-selects the served adapters when the store changes (`interval_s` > 0) and on demand
    (`reload`). Made and started by the service instance, stopped on shutdown; `stop_when`
    (the drain's flag) also ends it."""

    def __init__(
        self,
        engine: Publisher,
        policy: AdapterPolicy,
        settings: Settings,
        *,
        root: Path | None = None,
        stop_when: Callable[[], bool] = lambda: False,
    ):
        self.engine = engine
        self.policy = policy
        self.settings = settings
        self.interval_s = settings.adapter_watch_s
        self.root = root if root is not None else store_root()
        self.stop_when = stop_when
        self.seen: Signature | None = None
        """The listing the served set was last selected from (None: select at the next look)."""
        self._layers: BaseLayers | None = None
        self.checked = CheckedVersions()
        """Each version's check outcome while its files are unchanged: a re-selection re-reads
        only what changed."""
        self._reloading = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Apply the deny list and unloads now if there are any (the engine's first selection,
        made before this watcher existed, knows none), then look every `interval_s` seconds."""
        if self.policy.blocks():
            self.reload()
        if self.interval_s <= 0:
            log.info("adapter store watcher off (BENTOLORA_ADAPTER_WATCH_S=0)")
            return
        self._thread = threading.Thread(target=self._run, name="adapter-store-watcher", daemon=True)
        self._thread.start()
        log.info("watching %s for adapters every %d s", self.root, self.interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.stop_when():
                log.info("adapter store watcher stops: the server is draining")
                return
            self.check()

    def check(self) -> bool:
        """One look: re-select if the store changed since the last selection. True when it
        re-selected; errors are logged (never raised) and retried at the next look."""
        try:
            if store_signature(self.root, self.policy.path) == self.seen:
                return False
            self.reload()
            return True
        except Exception:
            log.exception("adapter store watch failed; trying again in %d s", self.interval_s)
            return False

    def reload(self) -> ServedSnapshot:
        """Select what to serve from the store now, with the deny list and unloads, and publish
        it. Raises what the selection raises (service.adapter_policy.DenyListError, store
        errors); the served set is then unchanged."""
        with self._reloading:
            signature = store_signature(self.root, self.policy.path)
            blocks = self.policy.blocks()
            found = select_adapters(
                self.layers(), self.engine.base, self.settings, blocks.why, self.checked
            )
            # Weights of versions an admin took out go now; those of versions superseded or
            # deleted stay loaded for the requests validated against them (LRU evicts them).
            served = self.engine.state.snapshot.adapters.values()
            blocked = [entry.tag for entry in served if blocks.why(entry)]
            snapshot = self.engine.serve_adapters(found, forget=blocked)
            self.seen = signature
        return snapshot

    def layers(self) -> BaseLayers:
        """The base's layers on the meta device (names and shapes; built once)."""
        if self._layers is None:
            self._layers = base_layers(self.engine.base)
        return self._layers
