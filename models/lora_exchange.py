"""LoRA files in and out of the store: `import_lora` makes a regular adapter of a kohya, diffusers
or PEFT file; `export_lora` writes a stored adapter as a kohya or diffusers file.

An import is checked as any adapter is before a server takes it (`models.adapter`,
`models.lora_fusion`): every layer exists in the base with fitting shapes, every tensor is
finite, and the diffusers file the store will hold is written and read back by the serving code
with the scales the source file meant; only then is the entry saved (atomically: a refused or
interrupted import stores nothing). Its metadata names its base like a trained adapter's and
records where it came from under `origin`: file name, format, sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.adapter import (
    AdapterError,
    AdapterInfo,
    get_adapter,
    load_adapter_weights,
    save_adapter,
    verify_adapter,
    weights_path,
    write_lora_file,
)
from models.bases import get_base
from models.lora_files import (
    BaseLayers,
    Layer,
    LoraFileError,
    Pair,
    kohya_state_dict,
    most_common,
    peft_layers,
    read_layers,
)
from models.lora_fusion import read_factors
from models.store import StoreEntry, adapter_store_name, check_name

log = logging.getLogger(__name__)

FORMATS = ("kohya", "diffusers")
"""What `export_lora` writes."""
KEPT_HEADER = (
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_output_name",
    "modelspec.architecture",
    "modelspec.title",
)
"""Header fields of a kohya file kept in the origin (the rest, e.g. tag counts, can be large)."""


@dataclass(frozen=True)
class ImportedAdapterInfo(AdapterInfo):
    """An adapter's metadata when it was made elsewhere: what any adapter has, and its origin."""

    origin: dict[str, Any] = field(default_factory=dict)
    """file (name), format, sha256, and for kohya files a few of its `ss_*` header fields."""


def base_layers(base: StoreEntry) -> BaseLayers:
    """The base's UNet and text encoders built from its configs on the meta device: every
    layer's name and shape, no weights read (a full-size base costs no memory here)."""
    folder = base.path
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
        )
    return BaseLayers(unet, text_encoder, text_encoder_2, tag=base.tag)


def import_lora(path: str | Path, name: str, *, base: str) -> StoreEntry:
    """Store the LoRA file `path` as adapter `lora-<name>` made for base `base`."""
    path = Path(path)
    check_name(adapter_store_name(name), "adapter name")
    base_entry = get_base(base)
    state_dict = load_adapter_weights(path)  # .safetensors only, readable, finite
    header = _header(path)
    skeleton = base_layers(base_entry)
    fmt, layers = read_layers(path, state_dict, header, skeleton)
    state, configs = peft_layers(layers)
    _check_as_served(path, state, configs, layers, skeleton)
    pairs = list(layers.values())
    info = ImportedAdapterInfo(
        base_tag=base_entry.tag,
        base_hash=base_entry.metadata["content_hash"],
        rank=most_common(p.rank for p in pairs),
        alpha=most_common(p.alpha for p in pairs),
        dropout=0.0,
        target_modules=sorted({_short(module) for _, module in layers}),
        text_encoder_lora=any(component != "unet" for component, _ in layers),
        origin=_origin(path, fmt, header),
    )
    entry = save_adapter(name, state, info, lora_config=configs)
    log.info("imported %s (%s, %d layers) as %s", path.name, fmt, len(layers), entry.tag)
    return entry


def _check_as_served(
    path: Path, state, configs, layers: dict[Layer, Pair], base: BaseLayers
) -> None:
    """Write the file the store will hold into a scratch folder and read it as a server does
    (`read_factors`: safetensors, finite, fits the base, scales from its header); each layer's
    scale must be the source file's alpha / rank."""
    with tempfile.TemporaryDirectory(prefix="bentolora-import-") as scratch:
        written = write_lora_file(scratch, state, configs)
        factors = read_factors(written, base, tag=path.name, device="meta")
    for layer, pair in layers.items():
        scaling = factors.layers[layer][2]
        if not abs(scaling - pair.alpha / pair.rank) <= 1e-6 * abs(pair.alpha / pair.rank):
            raise AdapterError(
                f"{path.name}: {pair.source} would be served with scale {scaling}, not "
                f"{pair.alpha / pair.rank} (alpha {pair.alpha} / rank {pair.rank}); not stored"
            )


def _origin(path: Path, fmt: str, header: dict[str, str]) -> dict[str, Any]:
    origin: dict[str, Any] = {"file": path.name, "format": fmt, "sha256": _sha256(path)}
    kept = {key: header[key][:200] for key in KEPT_HEADER if key in header}
    if kept:
        origin["header"] = kept
    return origin


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(module: str) -> str:
    """`…attn1.to_q` -> `to_q`, `…attn1.to_out.0` -> `to_out.0`: the name a target list uses."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def export_lora(tag: str, fmt: str, out: str | Path) -> Path:
    """Write adapter `tag` to the new file `out` (`.safetensors`) in format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(
            f"{out}: the file name must end in .safetensors (A1111 and ComfyUI list only those)"
        )
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder")
    entry = get_adapter(tag)
    base = get_base(entry.metadata.get("base_tag", ""))
    layers = base_layers(base)
    verify_adapter(entry, layers, base, max_bytes=sys.maxsize)  # as a server checks it
    pairs = stored_layers(entry, layers)
    if fmt == "diffusers":
        _publish(out, lambda scratch: _write_diffusers(pairs, scratch))
    else:
        state = kohya_state_dict(pairs, layers)
        header = _kohya_header(entry, pairs)
        _publish(out, lambda scratch: save_file(state, scratch, metadata=header))
    log.info("wrote %s as %s to %s", entry.tag, fmt, out)
    return out


def stored_layers(entry: StoreEntry, base: BaseLayers) -> dict[Layer, Pair]:
    """A stored adapter's layers: factors as stored (dtype kept), alpha = scale · rank with the
    scale the server applies."""
    state_dict = load_adapter_weights(weights_path(entry))
    factors = read_factors(weights_path(entry), base, tag=entry.tag, device="meta")
    layers = {}
    for (component, module), (_, _, scaling) in factors.layers.items():
        key = f"{component}.{module}"
        down, up = state_dict[f"{key}.lora_A.weight"], state_dict[f"{key}.lora_B.weight"]
        layers[(component, module)] = Pair(down, up, scaling * down.shape[0], key)
    return layers


def _write_diffusers(layers: dict[Layer, Pair], path: str) -> None:
    """diffusers' format as any diffusers version reads it: text-encoder layers under
    `text_model.` (diffusers drops it for transformers 5's flattened CLIPTextModel)."""
    state, configs = peft_layers(layers, classic=True)
    with tempfile.TemporaryDirectory(prefix="bentolora-export-") as scratch:
        shutil.move(write_lora_file(scratch, state, configs), path)


def _kohya_header(entry: StoreEntry, layers: dict[Layer, Pair]) -> dict[str, str]:
    """What sd-scripts writes that A1111 reads (SDXL, network module, dim, alpha) and where the
    file came from."""
    return {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_dim": str(most_common(p.rank for p in layers.values())),
        "ss_network_alpha": str(most_common(p.alpha for p in layers.values())),
        "ss_output_name": entry.name,
        "bentolora_adapter": entry.tag,
        "bentolora_base": f"{entry.metadata.get('base_tag')} ({entry.metadata.get('base_hash')})",
    }


def _publish(out: Path, write) -> None:
    """`write(scratch)` a file beside `out`, then link it in as `out`, which must not exist: a
    failed or interrupted export leaves no partial file and overwrites nothing."""
    fd, scratch = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        write(scratch)
        os.link(scratch, out)
    finally:
        os.unlink(scratch)


__all__ = [
    "FORMATS",
    "ImportedAdapterInfo",
    "LoraFileError",
    "base_layers",
    "export_lora",
    "import_lora",
]
