"""Per-image LoRA: one forward pass for a batch whose images use different adapter sets.

`models.lora_fusion` merges ONE set of adapters into the weights, so a batch that mixes sets
would need one pipeline call per set. Here each adapted layer gets, beside its unchanged base
weight, a batched low-rank term: the factors of every set in the batch are stacked into slots,
and each row of the layer's input picks its image's slot by index,

    y[n] = W x[n] + B[slot(n)] @ (A[slot(n)] @ x[n])

(a gather, then two batched matmuls). A set's slot holds its adapters' factors concatenated
along the rank, each up-factor multiplied by its adapter's scale and scaling, so a mix of two
adapters, a negative scale or a scale of 0 is one slot like any other; slot 0 is zeros (no
adapter). Rows map to images as the pipeline lays them out: the text encoders see one row per
image; the UNet sees one row per image, or two (unconditional half first) under
classifier-free guidance, so row n belongs to image n mod (images in the batch).

The slots live in buffers allocated once per layer at a fixed size (`slots` × `max_rank`; a
fused q/k/v projection holds its parts side by side, so `max_rank` for each) and filled in place
for each batch; the hooks read a flag and the index through one shared object.
So a compiled UNet sees the same shapes and the same tensors whatever the number of sets or the
mix: it compiles once with the term on and once with it off, and never again (tested with
dynamo's `error_on_recompile`).

What a set cannot do in one pass (it runs as its own call, merged, as before): LoRA on
convolutions (their factors are convolutions, not matrices) and a set whose ranks on one layer
add up to more than `max_rank`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from models.lora_fusion import Layer, LoraFactors, layer_rows

log = logging.getLogger(__name__)

AdapterSet = tuple[tuple[LoraFactors, float], ...]
"""The adapters one image uses, each with its scale; empty: the base alone."""


@dataclass
class _Switch:
    """What every hook reads: on or off, and each input row's slot (shared by all hooks)."""

    on: bool
    rows: torch.Tensor


class _Term:
    """The low-rank term of one module (a Linear, or the fused q/k/v Linear holding several
    layers' rows): buffers of `slots` × `max_rank` factors, and where each layer's rows sit."""

    def __init__(self, module: nn.Linear, slots: int, max_rank: int, switch: _Switch):
        weight = module.weight
        self.switch = switch
        self.max_rank = max_rank
        self.down = torch.zeros(
            slots, max_rank, module.in_features, dtype=weight.dtype, device=weight.device
        )
        self.up = torch.zeros(
            slots, module.out_features, max_rank, dtype=weight.dtype, device=weight.device
        )
        self.handle = module.register_forward_hook(self)

    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.switch.on:
            return output
        x = args[0]
        n = x.shape[0]
        slot = self.switch.rows[:n]
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), self.down[slot].transpose(1, 2))
        return output + torch.bmm(h, self.up[slot].transpose(1, 2)).view_as(output)


class PerImageLora:
    """The per-image terms of a pipeline's adapted layers. `fill(sets, per_image)` writes the
    slots, `on()`/`off()` switch the terms for the pipeline calls between; `mixable(set)` says
    whether a set can take part; `prepare(layers)` makes the terms ahead of the first mixed
    batch (a compiled UNet then compiles them during warm-up, not under traffic)."""

    def __init__(self, pipe, *, slots: int, max_rank: int):
        if slots < 2 or max_rank < 1:
            raise ValueError(f"slots ({slots}) must be ≥ 2 and max_rank ({max_rank}) ≥ 1")
        self.pipe = pipe
        self.slots = slots
        self.max_rank = max_rank
        device = pipe.unet.device
        # Rows: at most 2 × (slots - 1) images under guidance; one index for all layers.
        self._switch = _Switch(False, torch.zeros(4 * slots, dtype=torch.long, device=device))
        self._terms: dict[int, _Term] = {}  # id(module) -> its term
        self._where: dict[Layer, tuple[_Term, int, int]] = {}  # layer -> term, first row, rows

    def nbytes(self) -> int:
        """Bytes of the slot buffers (allocated once per adapted module)."""
        return sum(t.nbytes() for t in self._terms.values())

    def mixable(self, adapter_set: AdapterSet) -> str | None:
        """None if `adapter_set` can share a pass; else why not."""
        ranks: dict[Layer, int] = {}
        for factors, _ in adapter_set:
            for layer, (down, _, _) in factors.layers.items():
                if down.dim() != 2:
                    return f"{factors.tag} adapts a convolution ({layer[1]})"
                try:
                    self._place(layer)
                except ValueError as err:
                    return f"{factors.tag}: {err}"
                ranks[layer] = ranks.get(layer, 0) + down.shape[0]
        over = [layer for layer, rank in ranks.items() if rank > self.max_rank]
        if over:
            return (
                f"its ranks on {over[0][1]} add up to {ranks[over[0]]}, over the "
                f"{self.max_rank} of one slot (BENTOLORA_MIXED_MAX_RANK)"
            )
        return None

    @torch.no_grad()
    def fill(self, sets: Sequence[AdapterSet], per_image: Sequence[int]) -> None:
        """Write `sets` into slots 1… (slot 0 stays zero) and image i's rows to use slot
        `per_image[i] + 1` (-1: no adapter)."""
        if len(sets) >= self.slots:
            raise ValueError(f"{len(sets)} adapter sets in one pass; at most {self.slots - 1}")
        if 2 * len(per_image) > self._switch.rows.numel():
            raise ValueError(f"{len(per_image)} images in one pass; at most {2 * self.slots}")
        for term in self._terms.values():
            term.down.zero_()
            term.up.zero_()
        for slot, adapter_set in enumerate(sets, start=1):
            self._fill_slot(slot, adapter_set)
        self.set_rows(per_image)

    def set_rows(self, per_image: Sequence[int]) -> None:
        """Image i of the next call uses the set filled `per_image[i]`-th (-1: none); rows
        past the images repeat them (the second half of a guided batch)."""
        if 2 * len(per_image) > self._switch.rows.numel():
            raise ValueError(f"{len(per_image)} images in one pass; at most {2 * self.slots}")
        images = torch.tensor([s + 1 for s in per_image], dtype=torch.long)
        rows = images.repeat(self._switch.rows.numel() // len(per_image) + 1)
        self._switch.rows.copy_(rows[: self._switch.rows.numel()])

    def _fill_slot(self, slot: int, adapter_set: AdapterSet) -> None:
        used: dict[int, int] = {}  # id(term) -> rank columns taken in this slot
        for factors, scale in adapter_set:
            for layer, (down, up, scaling) in factors.layers.items():
                term, first, rows = self._place(layer)
                at = used.get(id(term), 0)
                rank = down.shape[0]
                if at + rank > term.max_rank:
                    raise ValueError(f"{factors.tag}: {self.mixable(adapter_set)}")
                term.down[slot, at : at + rank].copy_(down)
                term.up[slot, first : first + rows, at : at + rank].copy_(up * (scale * scaling))
                used[id(term)] = at + rank

    def prepare(self, layers: Iterable[Layer]) -> None:
        """Make the terms of `layers` now (each holds its slot buffers from then on); a layer
        that cannot take one is left out (its adapters then run as calls of their own)."""
        for layer in layers:
            try:
                self._place(layer)
            except ValueError as err:
                log.warning("no per-image LoRA term for %s: %s", layer, err)

    def _place(self, layer: Layer) -> tuple[_Term, int, int]:
        """The term that carries `layer` (made on first use) and the rows of its output."""
        where = self._where.get(layer)
        if where is None:
            module, first, rows, parts = _module_rows(self.pipe, layer)
            term = self._terms.get(id(module))
            if term is None:
                # A fused q/k/v projection carries its parts' ranks side by side in one slot:
                # each part may take max_rank columns.
                term = self._terms[id(module)] = _Term(
                    module, self.slots, self.max_rank * parts, self._switch
                )
            where = self._where[layer] = (term, first, rows)
        return where

    def on(self) -> None:
        self._switch.on = True

    def off(self) -> None:
        self._switch.on = False


def _module_rows(pipe, layer: Layer) -> tuple[nn.Linear, int, int, int]:
    """The Linear that computes `layer`, the first of its output rows that are `layer`'s and
    how many, and how many layers that Linear computes (`models.lora_fusion.layer_rows`)."""
    module, rows, parts = layer_rows(pipe, layer)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{layer[0]}.{layer[1]} is not a Linear layer")
    first, stop, _ = rows.indices(module.out_features)
    return module, first, stop - first, parts


def adapter_layers(path: str | Path) -> set[Layer]:
    """The Linear layers an adapter file adapts, read from its keys (no weights loaded)."""
    layers = set()
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith(".lora_A.weight") and len(f.get_slice(key).get_shape()) == 2:
                component, _, rest = key.partition(".")
                layers.add((component, rest.removesuffix(".lora_A.weight")))
    return layers
