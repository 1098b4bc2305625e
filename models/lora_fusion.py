"""LoRA merged into the base weights in place, so serving with an adapter costs no extra compute.

peft's LoRA layers (what `load_lora_weights` adds) run two extra matmuls beside every adapted
projection on every denoising step (+35% UNet time on an H100 for rank 8 on attention), and
loading or unloading one changes the module tree, which makes a compiled model recompile.
Here an adapter is read once into its low-rank factors on the device; activating a set of
(adapter, scale) writes `W0 + Σ scale · s · B @ A` into each adapted weight tensor in place
(computed in float32, stored in the weight's dtype, as diffusers' `fuse_lora` does). Modules,
parameters, shapes and addresses never change, so a compiled UNet (and a CUDA graph, which holds
weight addresses) stays valid across switches. The base values of every weight an adapter
touches are kept once, on the device, so switching never accumulates rounding and costs one
pass over those weights.

Scaling follows peft: `lora_alpha / r` (`/ sqrt(r)` with rsLoRA), `rank_pattern` and
`alpha_pattern` per module, read from the LoRA config diffusers writes in the file's header; a
file without that config has alpha = r (scaling 1), as `load_lora_weights` assumes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from models import float8
from models.adapter import AdapterError, check_fits, load_adapter_weights

log = logging.getLogger(__name__)

HEADER_KEY = "lora_adapter_metadata"
Layer = tuple[str, str]
"""(component, module path), e.g. ("unet", "mid_block.attentions.0.….attn1.to_q")."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's low-rank factors, ready to merge: per layer (down, up, scaling)."""

    tag: str
    layers: Mapping[Layer, tuple[torch.Tensor, torch.Tensor, float]]

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.layers.values())


def read_factors(path: str | Path, pipe, *, tag: str, device: str | torch.device) -> LoraFactors:
    """Read an adapter file (safetensors, finite, fitting `pipe`) into float32 factors on `device`."""
    state_dict = load_adapter_weights(path)
    check_fits(state_dict, pipe)
    configs = _header_configs(path)
    pairs: dict[Layer, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        module, _, which = rest.removesuffix(".weight").rpartition(".")
        pairs.setdefault((component, module), {})[which] = tensor
    layers = {}
    for (component, module), pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{tag}: {component}.{module} lacks its lora_A or lora_B weight")
        down, up = pair["lora_A"], pair["lora_B"]
        scaling = _scaling(configs.get(component), module, rank=down.shape[0], tag=tag)
        layers[(component, module)] = (
            down.to(device, torch.float32),
            up.to(device, torch.float32),
            scaling,
        )
    return LoraFactors(tag=tag, layers=layers)


def check_mergeable(path: str | Path, *, tag: str) -> None:
    """Raise AdapterError if the file's LoRA config is one `FusedLora` cannot merge (DoRA, LoRA
    bias, ranks other than the config says). Reads the header and shapes, not the weights."""
    configs = _header_configs(path)
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith(".lora_A.weight"):
                component, _, rest = key.partition(".")
                module = rest.removesuffix(".lora_A.weight")
                rank = f.get_slice(key).get_shape()[0]
                _scaling(configs.get(component), module, rank=rank, tag=tag)


def _header_configs(path: str | Path) -> dict[str, dict]:
    """Per component, the peft LoraConfig diffusers wrote in the header (flattened as
    `unet.r`, `unet.lora_alpha`, …); empty when the file has none."""
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(HEADER_KEY)
    if not raw:
        return {}
    configs: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _scaling(config: dict | None, module: str, *, rank: int, tag: str) -> float:
    if config is None:
        return 1.0  # diffusers loads a file without a config with lora_alpha = r
    unsupported = [
        name for name in ("use_dora", "lora_bias", "use_qalora", "use_bdlora") if config.get(name)
    ]
    if unsupported:
        raise AdapterError(
            f"{tag}: {', '.join(unsupported)} cannot be merged into the weights; serve it with "
            "BENTOLORA_LORA_MODE=peft"
        )
    r = _by_pattern(config.get("rank_pattern"), module, config.get("r", rank))
    alpha = _by_pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    if r != rank:
        raise AdapterError(f"{tag}: {module} has rank {rank} but its config says {r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _by_pattern(patterns: dict | None, module: str, default):
    """peft's rule: the first pattern that matches the end of the module's name (at a dot)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


MERGE_CHUNK_BYTES = 256 * 2**20
"""float32 bytes of base weights merged in one batched matmul at most (a chunk of a shape group)."""


class FusedLora:
    """The adapters merged into a pipeline's weights right now, and the base values under them.

    A switch is launch-bound, not bandwidth-bound (SDXL has ~560 adapted layers; merging them one
    by one took 160 ms on an H200, where reading and writing their weights takes ~5 ms). So the
    layers are grouped by shape and the rank of their merged terms: each group is one batched
    matmul (`base + (Σ scale·s·B) @ A`, the terms' factors concatenated along the rank), and each
    group's weights, and the restored ones, are written by one foreach copy."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._base: dict[Layer, tuple[torch.Tensor, ...]] = {}
        self._parts: dict[Layer, tuple[torch.Tensor, ...]] = {}
        self._merged: set[Layer] = set()
        self._active: tuple[tuple[str, float], ...] = ()
        """(tag, scale) of each adapter merged now; empty: the base's own weights."""

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """(tag, scale) of each adapter merged now."""
        return self._active

    @torch.no_grad()
    def activate(self, choices: Sequence[tuple[LoraFactors, float]]) -> bool:
        """Merge exactly `choices` (none: restore the base). Returns whether any weight changed."""
        wanted = tuple((f.tag, float(s)) for f, s in choices)
        if wanted == self._active:
            return False
        terms: dict[Layer, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for factors, scale in choices:
            for layer, (down, up, scaling) in factors.layers.items():
                terms.setdefault(layer, []).append((down, up, float(scale) * scaling))
        restored = sorted(self._merged - terms.keys())
        if restored:
            torch._foreach_copy_(
                [part for layer in restored for part in self._parts_of(layer)],
                [part for layer in restored for part in self._base[layer]],
            )
        for group in self._groups(terms):
            self._merge(group, terms)
        self._merged = set(terms)
        self._active = wanted
        return True

    def _groups(self, terms: Mapping[Layer, list]) -> list[list[Layer]]:
        """The layers of `terms` by (weight shape, dtype, merged rank), in chunks of at most
        MERGE_CHUNK_BYTES of float32 base weights."""
        groups: dict[tuple, list[Layer]] = {}
        for layer in sorted(terms):
            base = self._base_of(layer)
            rank = sum(down.shape[0] for down, _, _ in terms[layer])
            key = tuple((tuple(part.shape), part.dtype, part.device) for part in base)
            groups.setdefault((*key, rank), []).append(layer)
        chunks = []
        for ((shape, *_), *_), layers in groups.items():
            per_chunk = max(1, MERGE_CHUNK_BYTES // (4 * math.prod(shape)))
            chunks.extend(layers[i : i + per_chunk] for i in range(0, len(layers), per_chunk))
        return chunks

    def _merge(self, layers: list[Layer], terms: Mapping[Layer, list]) -> None:
        """`W0 + Σ coefficient · B @ A` (float32) into the weights of `layers`, which share a
        shape and merged rank: one batched matmul and one foreach copy. A float8 weight
        (`models.float8`) is merged from its kept float8 base and quantized again by rows."""
        ups = torch.stack(
            [torch.cat([up.flatten(1) * c for _, up, c in terms[layer]], dim=1) for layer in layers]
        )
        downs = torch.stack(
            [torch.cat([down.flatten(1) for down, _, _ in terms[layer]]) for layer in layers]
        )
        bases = [self._base[layer] for layer in layers]
        quantized = len(bases[0]) == 2  # (qdata, scale): a float8 weight
        if quantized:
            values = float8.dequantize_rows(
                torch.stack([q for q, _ in bases]), torch.stack([s for _, s in bases])
            )
        else:
            values = torch.stack([w for (w,) in bases]).float()
        merged = torch.baddbmm(values.flatten(2), ups, downs)
        if quantized:
            qdata, scale = float8.quantize_rows(merged, self._weight_dtype(layers[0]))
            sources = [t for pair in zip(qdata, scale, strict=True) for t in pair]
        else:
            sources = list(merged.to(bases[0][0].dtype))
        targets = [part for layer in layers for part in self._parts_of(layer)]
        torch._foreach_copy_(
            targets, [m.view(t.shape) for m, t in zip(sources, targets, strict=True)]
        )

    def _parts_of(self, layer: Layer) -> tuple[torch.Tensor, ...]:
        """The views that hold `layer`'s weight (`models.float8.parts`)."""
        found = self._parts.get(layer)
        if found is None:
            weight, rows = weight_rows(self.pipe, layer)
            found = self._parts[layer] = float8.parts(weight, rows)
        return found

    def _weight_dtype(self, layer: Layer) -> torch.dtype:
        return weight_rows(self.pipe, layer)[0].dtype

    def _base_of(self, layer: Layer) -> tuple[torch.Tensor, ...]:
        """`layer`'s base values, kept (once, on the weight's device) before its first merge."""
        base = self._base.get(layer)
        if base is None:
            base = self._base[layer] = tuple(p.detach().clone() for p in self._parts_of(layer))
        return base


def weight_of(pipe, layer: Layer) -> torch.Tensor:
    """The weight tensor (or, after `fuse_qkv_projections`, the rows of the fused one) that
    holds `layer`'s weights: writing into it changes what the model computes."""
    weight, rows = weight_rows(pipe, layer)
    return weight[rows]


def weight_rows(pipe, layer: Layer) -> tuple[torch.Tensor, slice]:
    """The weight parameter that holds `layer`'s weights, and its rows that do: all of them,
    or, after `fuse_qkv_projections`, the layer's share of the fused q/k/v weight."""
    module, rows, _ = layer_rows(pipe, layer)
    return module.weight, rows


def layer_rows(pipe, layer: Layer) -> tuple[torch.nn.Module, slice, int]:
    """The module that computes `layer`, the rows of its output (and weight) that are
    `layer`'s, and how many layers that module computes: 1, or after `fuse_qkv_projections`
    (diffusers' Attention then reads `to_qkv`, q, k and v stacked by rows, in self-attention,
    and `to_q` and `to_kv`, k and v stacked, in cross-attention) the fused projection's 3 or 2."""
    component, module_path = layer
    model = getattr(pipe, component)
    parent_path, _, name = module_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    own = model.get_submodule(module_path)
    if not getattr(parent, "fused_projections", False) or name not in ("to_q", "to_k", "to_v"):
        return own, slice(None), 1
    if not parent.is_cross_attention:
        order, fused = ("to_q", "to_k", "to_v"), parent.to_qkv
    elif name == "to_q":
        return own, slice(None), 1
    else:
        order, fused = ("to_k", "to_v"), parent.to_kv
    start = 0
    for part in order:
        rows = getattr(parent, part).weight.shape[0]
        if part == name:
            return fused, slice(start, start + rows), len(order)
        start += rows
    raise AssertionError(name)
