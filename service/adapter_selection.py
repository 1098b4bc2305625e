"""Which adapter versions in the store a server serves, and why it refuses the others."""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def select_adapters(
    pipe: StableDiffusionXLPipeline | BaseLayers,
    base: StoreEntry,
    settings: Settings,
    blocked: Blocked | None = None,
) -> StoreAdapters:
    """Read the store: per adapter name, the newest version made for `base` that passes every
    check (verify_adapter); versions that fail are listed as refused, with why. With
    BENTOLORA_PROMOTED_ONLY only versions labelled stage=production count; a name with no such
    version is refused as not promoted. A version `blocked` names a reason for (an admin's deny
    or unload) is refused with that reason, before any check reads its files.

    `pipe` is the serving pipeline or the base's layers on the meta device
    (`models.lora_exchange.base_layers`): only layer names and shapes are read."""
    served, foreign, refused = {}, {}, {}
    entries = list_adapters()  # newest first
    promoted = {e.name.removeprefix("lora-") for e in entries if is_production(e)}
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
        try:
            verify_adapter(entry, pipe, base, max_bytes=settings.max_adapter_bytes)
            if settings.lora_mode == "fused":
                check_mergeable(weights_path(entry), tag=entry.tag)
        except AdapterError as err:
            log.warning("refusing adapter %s: %s", entry.tag, err)
            refused.setdefault(name, str(err))
            continue
        served[name] = entry
    return StoreAdapters(
        served=served,
        refused={k: v for k, v in refused.items() if k not in served},
        foreign={k: v for k, v in foreign.items() if k not in served and k not in refused},
    )
