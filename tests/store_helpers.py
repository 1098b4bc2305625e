"""Small store entries for tests: a rank-2 adapter on one tiny-UNet layer, made for a given base;
and what the `bentoml` CLI says of the store (the peer the store is checked against)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from models.adapter import AdapterInfo, save_adapter
from models.store import StoreEntry

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
"""A 64-wide attention projection of the tiny UNet."""


def tiny_info(base: StoreEntry) -> AdapterInfo:
    return AdapterInfo(
        base_tag=base.tag,
        base_hash=base.metadata["content_hash"],
        rank=2,
        alpha=2.0,
        dropout=0.0,
        target_modules=["to_q"],
        text_encoder_lora=False,
    )


def one_layer(base: StoreEntry, value: float = 0.01) -> dict:
    """Peft-format LoRA weights for LAYER, every entry `value`."""
    return {
        "unet": {
            f"{LAYER}.lora_A.weight": torch.full((2, 64), value),
            f"{LAYER}.lora_B.weight": torch.full((64, 2), value),
        }
    }


def one_layer_adapter(name: str, base: StoreEntry, value: float = 0.01) -> StoreEntry:
    """Store `lora-<name>` made for `base`."""
    return save_adapter(name, one_layer(base, value), tiny_info(base))


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "proj_in")
TEXT = ("q_proj", "v_proj")


def attention_adapter(
    name: str, base: StoreEntry, pipe, seed: int, *, unet_targets=ATTENTION, rank=4, text=False
) -> StoreEntry:
    """Store `lora-<name>`: random factors (visible in the image) on `unet_targets` of `pipe`'s
    UNet (none: a text-encoder-only adapter), and on both text encoders when `text`."""
    from test_lora_fusion import random_factors

    parts = {}
    if unet_targets:
        parts["unet"] = random_factors(pipe.unet, unet_targets, lambda n: rank, seed)
    if text:
        parts["text_encoder"] = random_factors(pipe.text_encoder, TEXT, lambda n: 4, seed + 50)
        parts["text_encoder_2"] = random_factors(pipe.text_encoder_2, TEXT, lambda n: 4, seed + 60)
    info = AdapterInfo(
        base_tag=base.tag,
        base_hash=base.metadata["content_hash"],
        rank=rank,
        alpha=2.0 * rank,
        dropout=0.0,
        target_modules=list(unet_targets or TEXT),
        text_encoder_lora=text,
    )
    configs = {
        c: {
            "r": rank if c == "unet" else 4,
            "lora_alpha": 2.0 * rank,
            "target_modules": list(unet_targets if c == "unet" else TEXT),
        }
        for c in parts
    }
    return save_adapter(name, parts, info, lora_config=configs)


def bentoml_models(*args: str):
    """`bentoml models <args> -o json`, parsed: the store as BentoML itself reads it."""
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", *args, "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    ).stdout
    return json.loads(out)
