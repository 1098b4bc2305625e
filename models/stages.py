"""Release stages of adapter versions: the `stage` label (`production`, `archived`) and promotion.

A version becomes `stage=production` when it passes the quality gate (`python -m train evaluate
--promote`); the version that held the stage before it becomes `stage=archived`. A server with
BENTOLORA_PROMOTED_ONLY=1 serves, per adapter name, only the newest production version.
"""

from __future__ import annotations

import logging

from models.adapter import list_adapters
from models.store import StoreEntry, entry_lock, update_entry

log = logging.getLogger(__name__)

STAGE_LABEL = "stage"
PRODUCTION = "production"
ARCHIVED = "archived"


def is_production(entry: StoreEntry) -> bool:
    return entry.labels.get(STAGE_LABEL) == PRODUCTION


def production_versions(store_name: str) -> list[StoreEntry]:
    """Versions of adapter `lora-<name>` labelled stage=production, newest first."""
    return [e for e in list_adapters() if e.name == store_name and is_production(e)]


def promote(entry: StoreEntry) -> list[str]:
    """Label `entry` stage=production and every other production version of its name
    stage=archived, under the name's store lock; return the archived tags."""
    archived = []
    with entry_lock(entry.name):
        for other in production_versions(entry.name):
            if other.tag != entry.tag:
                update_entry(other.tag, labels={STAGE_LABEL: ARCHIVED})
                archived.append(other.tag)
        update_entry(entry.tag, labels={STAGE_LABEL: PRODUCTION})
    log.info("promoted %s to production; archived %s", entry.tag, ", ".join(archived) or "none")
    return archived
