"""SDXL ControlNets in the model store: import one (hub id, diffusers folder, single file), build
the tiny one tests use, load one for a pipeline and check that it fits the base's UNet."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel

from models.device import parse_dtype
from models.store import StoreEntry, create_entry, get_entry, list_entries

log = logging.getLogger(__name__)

KIND = "controlnet"
PREFIX = "controlnet-"
"""Store names of ControlNets start with this; requests name them without it."""
MUST_MATCH = (
    "cross_attention_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "block_out_channels",
    "in_channels",
)
"""UNet config fields a ControlNet must share with the base it conditions."""


def store_name(name: str) -> str:
    return name if name.startswith(PREFIX) else PREFIX + name


def save_controlnet(
    model: ControlNetModel, name: str, *, source: str, reuse_identical: bool = False
) -> StoreEntry:
    """Save `model` into the store as `controlnet-<name>`, with its source and dtype."""
    with create_entry(store_name(name), kind=KIND, reuse_identical=reuse_identical) as staged:
        model.save_pretrained(staged.path, safe_serialization=True)
        staged.metadata.update(
            {
                "source": source,
                "dtype": str(model.dtype).removeprefix("torch."),
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
    entry = get_entry(staged.tag, kind=KIND)
    log.info("stored ControlNet %s from %s", entry.tag, source)
    return entry


def import_controlnet(
    source: str, name: str, *, dtype: str = "float16", single_file_config: str | None = None
) -> StoreEntry:
    """A ControlNet from a hub id or diffusers folder (`from_pretrained`) or one .safetensors
    file (`from_single_file`, with `single_file_config` for its diffusers config), stored."""
    torch_dtype = parse_dtype(dtype)
    if Path(source).is_file():
        model = ControlNetModel.from_single_file(
            source, config=single_file_config, dtype=torch_dtype
        )
    else:
        model = ControlNetModel.from_pretrained(source, dtype=torch_dtype)
    return save_controlnet(model, name, source=source)


def build_tiny_controlnet(unet: Any, seed: int = 0) -> ControlNetModel:
    """A ControlNet of the tiny UNet's shape (`from_unet`: its encoder's weights), whose zero
    convolutions are given small random weights from `seed`, so that it changes the image (as a
    trained one does) and a conditioning scale of 0 is not trivially the plain image."""
    model = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [*model.controlnet_down_blocks, model.controlnet_mid_block]
    zero_convs.append(model.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    return model


def get_controlnet(name: str) -> StoreEntry:
    """The store entry of ControlNet `name` (with or without its prefix, optional version)."""
    return get_entry(store_name(name), kind=KIND)


def controlnet_names() -> list[str]:
    """The ControlNets in the store, as requests name them."""
    return sorted({e.name.removeprefix(PREFIX) for e in list_entries(KIND)})


def load_controlnet(entry: StoreEntry, unet: Any) -> ControlNetModel:
    """ControlNet `entry` on `unet`'s device and dtype; ValueError when it does not fit `unet`."""
    model = ControlNetModel.from_pretrained(entry.path)
    wrong = [
        f"{key} {model.config.get(key)!r} (the base has {unet.config.get(key)!r})"
        for key in MUST_MATCH
        if _plain(model.config.get(key)) != _plain(unet.config.get(key))
    ]
    if wrong:
        raise ValueError(
            f"ControlNet {entry.name.removeprefix(PREFIX)!r} does not fit this base: "
            + "; ".join(wrong)
        )
    return model.to(unet.device, unet.dtype).eval().requires_grad_(False)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value
