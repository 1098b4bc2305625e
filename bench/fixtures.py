"""The benchmark's store: a base (tiny or full-size SDXL), a tiny CLIP and random LoRA adapters.

Import only after BENTOML_HOME points at the temporary store (bench.run does that first).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from models.adapter import AdapterInfo, save_adapter
from models.bases import save_base
from models.clip import build_tiny_clip, save_clip
from models.device import resolve_dtype
from models.store import StoreEntry

log = logging.getLogger(__name__)

BASE = "bench-base"
CLIP = "bench-clip"
ADAPTERS = ("bench-a", "bench-b")
"""The two adapters of the switching and HTTP rows; the mixed-traffic rows add bench-02…"""
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections, where the issue measures a rank-8 LoRA."""


def build_base(model: str, device: str) -> tuple[StoreEntry, dict[str, float]]:
    """Build the base (`tiny` or `full`) and save it into the store; returns its entry and times."""
    started = time.perf_counter()
    if model == "tiny":
        from models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(0)
    else:
        from models.full_size import build_full_size_pipeline

        dtype = resolve_dtype("auto", device)
        pipe = build_full_size_pipeline(dtype=dtype, device=device)
    built = time.perf_counter()
    entry = save_base(pipe, BASE, source=f"bench:{model}")
    saved = time.perf_counter()
    del pipe
    log.info("base %s: built in %.1f s, saved in %.1f s", entry.tag, built - started, saved - built)
    return entry, {"build_s": built - started, "save_s": saved - built}


def build_clip() -> StoreEntry:
    model, tokenizer = build_tiny_clip(0)
    return save_clip(model, tokenizer, CLIP, source="bench:tiny-clip")


def random_lora(unet: nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Peft-format LoRA weights on every attention projection of `unet`, small random values.

    A ~ N(0, 1/in) and B ~ N(0, 0.05²): the update changes the image measurably without
    swamping it, and is different for each seed.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in TARGETS):
            if ".attn" not in name:
                continue
            a = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=generator) * 0.05
            layers[f"{name}.lora_A.weight"] = a
            layers[f"{name}.lora_B.weight"] = b
    return layers


def build_adapters(
    base: StoreEntry, unet: nn.Module, rank: int, count: int = len(ADAPTERS)
) -> list[StoreEntry]:
    """`count` adapters made for `base`: those of ADAPTERS, then bench-02, bench-03, …"""
    names = [*ADAPTERS, *(f"bench-{i:02d}" for i in range(len(ADAPTERS), count))][:count]
    entries = []
    for seed, name in enumerate(names):
        info = AdapterInfo(
            base_tag=base.tag,
            base_hash=base.metadata["content_hash"],
            rank=rank,
            alpha=float(rank),
            dropout=0.0,
            target_modules=list(TARGETS),
            text_encoder_lora=False,
        )
        entries.append(save_adapter(name, {"unet": random_lora(unet, rank, seed)}, info))
    return entries
