"""Which adapters sit where: the store, host memory, the device; and which are active.

Tiers (BENTOLORA_LORA_MODE=fused, the default): an adapter's low-rank factors are read from the
store into host memory, then copied to the device, where a batch can use them. Each tier is
bounded in bytes (BENTOLORA_ADAPTER_HOST_BYTES, BENTOLORA_ADAPTER_DEVICE_BYTES); least recently
used adapters leave first (the device copy is dropped, the host copy stays until host memory
needs the room; a dropped adapter is read again on its next use). Memory therefore stays within
those bounds however many adapters are used over time.

Loading is separate from running: `prefetch` brings a set to the device from any thread
without the pipeline, so the batcher loads an adapter beside the running batches, and only the
requests that need it wait (service.batcher). `activate` then only switches.

Applying a batch's adapters:
- one set for the whole batch: merged into the base weights in place (`models.lora_fusion`):
  no extra compute per step, no recompilation;
- several sets in one batch: the per-image low-rank terms of `models.lora_batched`, one UNet
  pass for all images (`activate_mixed`; the weights hold the base).
BENTOLORA_LORA_MODE=peft uses diffusers' `load_lora_weights` + `set_adapters` instead (any
format diffusers reads, DoRA included), one set per pipeline call, at most `PEFT_LOADED`
adapters loaded; tiers do not apply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from diffusers import StableDiffusionXLPipeline

from models import failpoints
from models.adapter import apply_adapters, check_made_for, weights_path
from models.lora_batched import PerImageLora, adapter_layers
from models.lora_fusion import FusedLora, LoraFactors, read_factors
from models.store import StoreEntry
from service.settings import LORA_MODES

log = logging.getLogger(__name__)

Choices = tuple[tuple[StoreEntry, float], ...]
PEFT_LOADED = 16


def set_key(choices: Choices) -> tuple:
    """What identifies an adapter set: each version's tag and scale (StoreEntry is unhashable)."""
    return tuple((entry.tag, scale) for entry, scale in choices)


"""Adapters kept loaded as peft layers (BENTOLORA_LORA_MODE=peft)."""


class _Tier:
    """Factors by store tag, least recently used first, at most `limit` bytes (one entry may
    exceed it alone: an adapter that fits no tier could never be served)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: OrderedDict[str, LoraFactors] = OrderedDict()

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in self.items.values())

    def get(self, tag: str) -> LoraFactors | None:
        factors = self.items.get(tag)
        if factors is not None:
            self.items.move_to_end(tag)
        return factors

    def put(self, factors: LoraFactors, keep: set[str]) -> list[str]:
        """Add `factors`; drop least recently used entries not in `keep` until within the
        limit. Returns the dropped tags."""
        self.items[factors.tag] = factors
        self.items.move_to_end(factors.tag)
        dropped = []
        for tag in list(self.items):
            if self.nbytes() <= self.limit:
                break
            if tag != factors.tag and tag not in keep:
                del self.items[tag]
                dropped.append(tag)
        return dropped


class AdapterCache:
    """The adapters of one pipeline: where each is (`tier`), which are active (`activate`,
    `activate_mixed`). Thread-safe for `prefetch` beside a running batch."""

    def __init__(
        self,
        pipe: StableDiffusionXLPipeline,
        base: StoreEntry,
        *,
        mode: str = "fused",
        device: str = "cpu",
        device_bytes: int = 2**31,
        host_bytes: int = 2**33,
        mixed: PerImageLora | None = None,
        on_change: Callable[[dict[str, str]], None] | None = None,
    ):
        if mode not in LORA_MODES:
            raise ValueError(f"LoRA mode {mode!r} is not one of {', '.join(LORA_MODES)}")
        self.pipe = pipe
        self.base = base
        self.mode = mode
        self.device = device
        self.mixed = mixed if mode == "fused" else None
        self.on_change = on_change
        """Called with `tiers()` after each change of where adapters are (e.g. to publish it)."""
        self.last_switch_s = 0.0
        """Seconds the last activation spent changing weights or scales (0 when nothing changed)."""
        self._host = _Tier(host_bytes)
        self._device = _Tier(device_bytes)
        self._in_use: set[str] = set()  # tags of the batch running now: never evicted
        self._lock = threading.Lock()  # the tiers' bookkeeping (not held while reading files)
        self._peft: OrderedDict[str, str] = OrderedDict()  # peft mode: tag -> adapter name
        self._fused = FusedLora(pipe) if mode == "fused" else None
        self._mixed_keys: tuple | None = None  # the sets the per-image terms hold now
        self._slot_of: dict[int, int] = {}  # index into those sets -> filled-set index

    # -- where adapters are -------------------------------------------------------------

    def holds(self, entry: StoreEntry) -> bool:
        """`entry`'s weights are loaded (host or device): using it reads no file."""
        with self._lock:
            return (
                entry.tag in self._peft
                or entry.tag in self._device.items
                or (entry.tag in self._host.items)
            )

    def resident(self, choices: Choices) -> bool:
        """Every adapter of `choices` is ready to use without loading (on the device; peft mode:
        loading happens in `activate`, so always)."""
        if self.mode == "peft":
            return True
        with self._lock:
            return all(e.tag in self._device.items for e, _ in choices)

    def tiers(self) -> dict[str, str]:
        """Store tag -> "device" or "host" for every loaded adapter (others are in the store)."""
        with self._lock:
            where = {tag: "host" for tag in self._host.items}
            where |= {tag: "device" for tag in self._device.items}
            where |= {tag: "device" for tag in self._peft}
        return where

    def device_bytes(self) -> int:
        """Bytes of factors held in the device tier (plus the per-image slot buffers)."""
        with self._lock:
            held = self._device.nbytes()
        return held + (self.mixed.nbytes() if self.mixed is not None else 0)

    def prefetch(self, choices: Choices) -> None:
        """Bring every adapter of `choices` to the device (fused mode; reads files outside the
        lock, so it may run beside a batch)."""
        if self.mode == "fused":
            for entry, _ in choices:
                self._factors(entry)

    def _factors(self, entry: StoreEntry) -> LoraFactors:
        with self._lock:
            factors = self._device.get(entry.tag)
            on_host = self._host.get(entry.tag) if factors is None else None
        if factors is not None:
            return factors
        if on_host is None:
            check_made_for(entry, self.base)
            failpoints.hit("adapter.load")
            started = time.perf_counter()
            on_host = read_factors(weights_path(entry), self.pipe, tag=entry.tag, device="cpu")
            log.info(
                "read adapter %s (%.1f MB of factors) in %.2f s",
                entry.tag,
                on_host.nbytes() / 1e6,
                time.perf_counter() - started,
            )
        factors = _to(on_host, self.device)
        with self._lock:
            dropped_host = self._host.put(on_host, keep=set())
            dropped = self._device.put(factors, keep=self._in_use)
        for tag in dropped + dropped_host:
            log.info("adapter %s left the %s tier", tag, "device" if tag in dropped else "host")
        self._changed()
        return factors

    def forget(self, tag: str) -> bool:
        """Drop `tag`'s loaded weights (an adapter unloaded or denied); the next activation
        without it restores the base. Returns whether it was loaded."""
        with self._lock:
            found = [t.items.pop(tag, None) for t in (self._host, self._device)]
            name = self._peft.pop(tag, None)
        if self._fused is not None and any(t == tag for t, _ in self._fused.active):
            self._fused.activate([])
        self._mixed_keys = None  # the per-image terms are refilled on their next use
        if name is not None:
            self.pipe.delete_adapters(name)
        loaded = name is not None or any(f is not None for f in found)
        if loaded:
            log.info("unloaded adapter %s", tag)
            self._changed()
        return loaded

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.tiers())

    # -- what is active ----------------------------------------------------------------

    def mixable(self, choices: Choices) -> str | None:
        """None if `choices` can share a pass with other sets (activate_mixed); else why not."""
        if self.mixed is None:
            return "per-image LoRA is off (BENTOLORA_LORA_MODE=peft or BENTOLORA_MIXED_MAX_RANK=0)"
        return self.mixed.mixable(tuple((self._factors(e), s) for e, s in choices))

    def prepare_mixed(self, entries: Sequence[StoreEntry]) -> None:
        """Make the per-image terms of every layer `entries` adapt (before traffic)."""
        if self.mixed is not None:
            for entry in entries:
                self.mixed.prepare(adapter_layers(weights_path(entry)))

    def activate(self, choices: Choices) -> None:
        """One set for the whole next pipeline call."""
        started = time.perf_counter()
        if self._fused is not None:
            factors = [(self._factors(e), s) for e, s in choices]
            with self._lock:
                self._in_use = {e.tag for e, _ in choices}
            if self.mixed is not None:
                self.mixed.off()
                self._mixed_keys = None
            changed = self._fused.activate(factors)
        else:
            changed = self._activate_peft(choices)
        self.last_switch_s = time.perf_counter() - started if changed else 0.0

    def activate_mixed(self, sets: Sequence[Choices], per_image: Sequence[int]) -> None:
        """Several sets in the next pipeline call: image i uses `sets[per_image[i]]` (an empty
        set: the base alone). The base weights are restored and the per-image terms filled;
        when `sets` are those of the last call, only the rows are set (cheap: the step
        scheduler calls this at every step)."""
        if self.mixed is None:
            raise ValueError("mixed adapter sets need BENTOLORA_LORA_MODE=fused")
        started = time.perf_counter()
        keys = tuple(set_key(c) for c in sets)
        if keys != self._mixed_keys or self._fused.active:
            loaded = [tuple((self._factors(e), s) for e, s in c) for c in sets]
            with self._lock:
                self._in_use = {e.tag for c in sets for e, _ in c}
            self._fused.activate([])
            self._slot_of = {}
            for index, adapter_set in enumerate(loaded):
                if adapter_set:
                    self._slot_of[index] = len(self._slot_of)
            self.mixed.fill([c for c in loaded if c], self.mixed_slots(per_image))
            self._mixed_keys = keys
            self.last_switch_s = time.perf_counter() - started
        else:
            self.mixed.set_rows(self.mixed_slots(per_image))
            self.last_switch_s = 0.0
        self.mixed.on()

    def mixed_slots(self, per_image: Sequence[int]) -> list[int]:
        """The filled-set index of each image, given its index into the last `activate_mixed`'s
        sets (-1 for none or an empty set)."""
        return [self._slot_of.get(i, -1) for i in per_image]

    def _activate_peft(self, choices: Choices) -> bool:
        if not choices:
            if self._peft:
                self.pipe.disable_lora()
            return bool(self._peft)
        for entry, _ in choices:
            self._peft.pop(entry.tag, None)
        while self._peft and len(self._peft) + len(choices) > PEFT_LOADED:
            tag, name = self._peft.popitem(last=False)
            log.info("unloading adapter %s", tag)
            self.pipe.delete_adapters(name)
        names = apply_adapters(self.pipe, choices, base=self.base)
        for (entry, _), name in zip(choices, names, strict=True):
            self._peft[entry.tag] = name
        self.pipe.enable_lora()
        self._changed()
        return True


def _to(factors: LoraFactors, device: str) -> LoraFactors:
    """`factors` on `device` (the same object when already there)."""
    layers = {
        layer: (down.to(device), up.to(device), scaling)
        for layer, (down, up, scaling) in factors.layers.items()
    }
    return LoraFactors(tag=factors.tag, layers=layers)
