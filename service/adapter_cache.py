"""Which adapters sit in the pipeline: loaded on first use, kept for reuse, evicted when many.

Two ways to apply them (BENTOLORA_LORA_MODE):
- `fused` (default): each adapter's low-rank factors are kept on the device and the active set
  is merged into the base weights in place (`models.lora_fusion`): no extra compute per step,
  and the module tree never changes, so a compiled UNet never recompiles. Switching costs one
  pass over the adapted weights.
- `peft`: diffusers' `load_lora_weights` + `set_adapters` (peft LoRA layers beside the base
  weights): two extra small matmuls per adapted layer per step; any adapter format diffusers
  reads (DoRA included).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from diffusers import StableDiffusionXLPipeline

from models.adapter import apply_adapters, check_made_for, weights_path
from models.lora_fusion import FusedLora, LoraFactors, read_factors
from models.store import StoreEntry
from service.settings import LORA_MODES

log = logging.getLogger(__name__)


class AdapterCache:
    """Activates a set of (adapter, scale) on the pipeline. At most `max_loaded` adapters stay
    loaded (least recently used leaves first); loading a new one costs one file read."""

    def __init__(
        self,
        pipe: StableDiffusionXLPipeline,
        base: StoreEntry,
        *,
        mode: str = "fused",
        device: str = "cpu",
        max_loaded: int = 16,
    ):
        if mode not in LORA_MODES:
            raise ValueError(f"LoRA mode {mode!r} is not one of {', '.join(LORA_MODES)}")
        self.pipe = pipe
        self.base = base
        self.mode = mode
        self.device = device
        self.max_loaded = max_loaded
        self.last_switch_s = 0.0
        """Seconds the last `activate` spent changing weights or scales (0 when nothing changed)."""
        # store tag -> peft adapter name (peft mode) or the factors (fused mode)
        self._loaded: OrderedDict[str, str | LoraFactors] = OrderedDict()
        self._fused = FusedLora(pipe) if mode == "fused" else None

    def holds(self, entry: StoreEntry) -> bool:
        """`entry`'s weights are loaded: activating it reads no file."""
        return entry.tag in self._loaded

    def activate(self, choices: Sequence[tuple[StoreEntry, float]]) -> None:
        started = time.perf_counter()
        if self._fused is not None:
            changed = self._fused.activate([(self._factors(e), s) for e, s in choices])
        else:
            changed = self._activate_peft(choices)
        self.last_switch_s = time.perf_counter() - started if changed else 0.0

    def _factors(self, entry: StoreEntry) -> LoraFactors:
        factors = self._loaded.pop(entry.tag, None)
        if factors is None:
            check_made_for(entry, self.base)
            self._evict(room_for=1)
            factors = read_factors(
                weights_path(entry), self.pipe, tag=entry.tag, device=self.device
            )
            log.info("loaded adapter %s (%.1f MB of factors)", entry.tag, factors.nbytes() / 1e6)
        self._loaded[entry.tag] = factors
        return factors

    def _activate_peft(self, choices: Sequence[tuple[StoreEntry, float]]) -> bool:
        if not choices:
            if self._loaded:
                self.pipe.disable_lora()
            return bool(self._loaded)
        for entry, _ in choices:
            self._loaded.pop(entry.tag, None)
        self._evict(room_for=len(choices))
        names = apply_adapters(self.pipe, choices, base=self.base)
        for (entry, _), name in zip(choices, names, strict=True):
            self._loaded[entry.tag] = name
        self.pipe.enable_lora()
        return True

    def _evict(self, room_for: int) -> None:
        while self._loaded and len(self._loaded) + room_for > self.max_loaded:
            tag, loaded = self._loaded.popitem(last=False)
            log.info("unloading adapter %s", tag)
            if isinstance(loaded, str):
                self.pipe.delete_adapters(loaded)
