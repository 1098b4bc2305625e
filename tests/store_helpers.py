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
