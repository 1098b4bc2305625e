"""Which adapters sit in the pipeline: loaded on first use, kept for reuse, evicted when many."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from diffusers import StableDiffusionXLPipeline

from models.adapter import apply_adapters
from models.store import StoreEntry

log = logging.getLogger(__name__)


class AdapterCache:
    """Activates a set of (adapter, scale) on the pipeline; switching between loaded adapters is
    only a change of scales (no weights move), loading a new one costs one file read."""

    def __init__(self, pipe: StableDiffusionXLPipeline, base: StoreEntry, max_loaded: int = 16):
        self.pipe = pipe
        self.base = base
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, str] = OrderedDict()  # store tag -> peft adapter name

    def activate(self, choices: Sequence[tuple[StoreEntry, float]]) -> None:
        if not choices:
            if self._loaded:
                self.pipe.disable_lora()
            return
        for entry, _ in choices:
            self._loaded.pop(entry.tag, None)
        self._evict(keep={entry.tag for entry, _ in choices})
        names = apply_adapters(self.pipe, choices, base=self.base)
        for (entry, _), name in zip(choices, names, strict=True):
            self._loaded[entry.tag] = name
        self.pipe.enable_lora()

    def _evict(self, keep: set[str]) -> None:
        while len(self._loaded) + len(keep) > self.max_loaded:
            tag, name = self._loaded.popitem(last=False)
            log.info("unloading adapter %s", tag)
            self.pipe.delete_adapters(name)
