"""LoRA adapters: the diffusers-format weights file, its metadata, and checks against a base.

An adapter is one `pytorch_lora_weights.safetensors` that `StableDiffusionXLPipeline.
load_lora_weights` reads as is (keys `unet.…`, `text_encoder.…`, `text_encoder_2.…`, peft's
`lora_A`/`lora_B` naming, rank and alpha in the file's header) plus metadata in the store entry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from models.hashing import hash_folder
from models.store import (
    BASE_LABEL,
    StoreEntry,
    StoreError,
    adapter_store_name,
    create_entry,
    get_entry,
    list_entries,
)

log = logging.getLogger(__name__)

KIND = "adapter"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class AdapterError(ValueError):
    """An adapter does not fit a base, or its weights are unusable."""


@dataclass(frozen=True)
class AdapterInfo:
    """What the store keeps about an adapter beside its weights."""

    base_tag: str
    """Store tag (name:version) of the base it was trained on."""
    base_hash: str
    """Content hash of that base: the service refuses the adapter on any other base."""
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]
    text_encoder_lora: bool
    """Whether the two text encoders carry LoRA layers too."""
    training_config: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    """Dataset summary, including its fingerprint."""
    steps: int = 0
    final_loss: float = float("nan")
    validation: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    processes: int = 1
    """Data-parallel processes the run used."""

    def to_metadata(self) -> dict[str, Any]:
        return asdict(self)


def lora_layers(state_dict: Mapping[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """The entries of `component` (`unet`, `text_encoder`, …) with the prefix removed."""
    prefix = component + "."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def check_finite(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise AdapterError naming the first tensor holding NaN or inf."""
    for key, tensor in state_dict.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter weight {key} is not finite; refusing to store or load it")


def save_adapter(
    name: str,
    layers: Mapping[str, Mapping[str, torch.Tensor]],
    info: AdapterInfo,
    *,
    lora_config: Mapping[str, Mapping[str, Any]] | None = None,
) -> StoreEntry:
    """Write an adapter into the store as `lora-<name>` and return its entry.

    Args:
        name: adapter name, with or without the `lora-` prefix.
        layers: per component (`unet`, `text_encoder`, `text_encoder_2`), peft state dicts as
            `peft.get_peft_model_state_dict` returns them.
        info: metadata.
        lora_config: per component, the LoraConfig as a dict; diffusers stores it in the file
            header so `load_lora_weights` applies the right alpha.
    """
    store_name = adapter_store_name(name)
    for component, sd in layers.items():
        if component not in COMPONENTS:
            raise AdapterError(f"unknown component {component!r}; allowed: {', '.join(COMPONENTS)}")
        check_finite({f"{component}.{k}": v for k, v in sd.items()})
    base_name = info.base_tag.split(":", 1)[0]
    with create_entry(store_name, kind=KIND, labels={BASE_LABEL: base_name}) as staged:
        write_lora_file(staged.path, layers, lora_config)
        staged.metadata.update(info.to_metadata())
    return get_entry(staged.tag, kind=KIND)


def write_lora_file(
    folder: str | Path,
    layers: Mapping[str, Mapping[str, torch.Tensor]],
    lora_config: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """`folder/pytorch_lora_weights.safetensors` in diffusers' format (what the store holds and
    `load_lora_weights` reads), the LoRA config of each component in its header."""
    lora_config = lora_config or {}
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers.get("unet"),
        text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"),
        unet_lora_adapter_metadata=lora_config.get("unet"),
        text_encoder_lora_adapter_metadata=lora_config.get("text_encoder"),
        text_encoder_2_lora_adapter_metadata=lora_config.get("text_encoder_2"),
        weight_name=WEIGHTS_NAME,
    )
    return Path(folder) / WEIGHTS_NAME


def get_adapter(name_or_tag: str) -> StoreEntry:
    """Find an adapter by `style`, `lora-style` or `lora-style:version`."""
    tag = name_or_tag if name_or_tag.startswith("lora-") else adapter_store_name(name_or_tag)
    if ":" in name_or_tag and not name_or_tag.startswith("lora-"):
        tag = adapter_store_name(name_or_tag) + ":" + name_or_tag.split(":", 1)[1]
    return get_entry(tag, kind=KIND)


def list_adapters(base: str | None = None) -> list[StoreEntry]:
    """Adapter versions in the store, newest first; only those made for base name `base` if given."""
    entries = list_entries(KIND)
    if base is not None:
        entries = [e for e in entries if e.labels.get(BASE_LABEL) == base.split(":", 1)[0]]
    return entries


def weights_path(entry: StoreEntry) -> Path:
    return entry.path / WEIGHTS_NAME


def load_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an adapter file: safetensors only, every tensor finite."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: adapters must be .safetensors (pickled weights are refused)")
    try:
        state_dict = load_file(path)
    except Exception as err:  # safetensors raises several types for damaged files
        raise AdapterError(f"{path}: not a readable safetensors file ({err})") from err
    check_finite(state_dict)
    return state_dict


def check_fits(state_dict: Mapping[str, torch.Tensor], pipe: StableDiffusionXLPipeline) -> None:
    """Raise AdapterError unless every LoRA tensor names a layer of `pipe` with matching shapes.

    Runs before any weight reaches the pipeline, so a foreign adapter never half-loads.
    """
    problems: list[str] = []
    for key, tensor in state_dict.items():
        problem = _check_key(key, tensor, pipe)
        if problem:
            problems.append(problem)
    if not state_dict:
        problems.append("the adapter holds no tensors")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise AdapterError(f"adapter does not fit this base: {shown}{more}")


def _check_key(key: str, tensor: torch.Tensor, pipe: StableDiffusionXLPipeline) -> str | None:
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        return f"{key}: unknown component {component!r}"
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):  # noqa: B007
        if rest.endswith(suffix):
            module_path = rest[: -len(suffix)]
            break
    else:
        return f"{key}: not a lora_A/lora_B weight"
    try:
        layer = getattr(pipe, component).get_submodule(module_path)
    except AttributeError:
        return f"{key}: the base has no layer {component}.{module_path}"
    # A layer that already carries LoRA (another adapter loaded) wraps the original one.
    layer = getattr(layer, "base_layer", layer)
    if isinstance(layer, torch.nn.Linear):
        fan_in, fan_out = layer.in_features, layer.out_features
    elif isinstance(layer, torch.nn.Conv2d):
        fan_in, fan_out = layer.in_channels, layer.out_channels
    else:
        return (
            f"{key}: {component}.{module_path} is a {type(layer).__name__}, not a Linear or Conv2d"
        )
    expected_dim, actual_dim = (
        (fan_in, tensor.shape[1]) if kind == "A" else (fan_out, tensor.shape[0])
    )
    if tensor.ndim < 2 or actual_dim != expected_dim:
        return f"{key}: shape {tuple(tensor.shape)} does not fit a layer of {fan_in}->{fan_out}"
    return None


def check_made_for(adapter: StoreEntry, base: StoreEntry) -> None:
    """Raise AdapterError unless `adapter` was trained on exactly this base (by content hash)."""
    want = adapter.metadata.get("base_hash")
    have = base.metadata.get("content_hash")
    if not want or want != have:
        raise AdapterError(
            f"{adapter.tag} was made for base {adapter.metadata.get('base_tag')!r} "
            f"(hash {str(want)[:12]}), not for {base.tag} (hash {str(have)[:12]})"
        )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def verify_adapter(
    entry: StoreEntry, pipe: StableDiffusionXLPipeline, base: StoreEntry, *, max_bytes: int
) -> None:
    """Every check an adapter passes before a server takes it; AdapterError names the failure.

    Made for this base (content hash); a safetensors weights file (pickled weights are never
    read); under the size cap; files unchanged since the save (the entry's content hash, which
    catches truncation and corruption); tensors finite; keys and shapes fit `pipe`. Only the
    CPU sees the weights here.
    """
    check_made_for(entry, base)
    path = weights_path(entry)
    if not path.is_file():
        pickled = sorted(p.name for p in entry.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterError(
                f"{entry.tag} holds pickled weights ({', '.join(pickled)}), which are never "
                f"loaded; save it as {WEIGHTS_NAME}"
            )
        raise AdapterError(f"{entry.tag} has no {WEIGHTS_NAME}")
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"{entry.tag}: {size} bytes of weights; the limit is {max_bytes}")
    if hash_folder(entry.path) != entry.metadata.get("content_hash"):
        raise AdapterError(
            f"{entry.tag}: its files differ from those saved (content hash mismatch: damaged, "
            "truncated or edited)"
        )
    check_fits(load_adapter_weights(path), pipe)


def apply_adapters(
    pipe: StableDiffusionXLPipeline,
    adapters: Sequence[tuple[StoreEntry, float]],
    *,
    base: StoreEntry | None = None,
) -> list[str]:
    """Load store adapters into `pipe` and activate them with the given scales.

    Each adapter is checked (made for `base` when given; keys and shapes against `pipe`) before
    its weights are loaded. Returns the peft adapter names used.
    """
    names: list[str] = []
    scales: list[float] = []
    loaded = (
        set(pipe.get_list_adapters().get("unet", []))
        if hasattr(pipe, "get_list_adapters")
        else set()
    )
    for entry, scale in adapters:
        if base is not None:
            check_made_for(entry, base)
        adapter_name = entry.tag.replace(":", "_").replace(".", "_")
        if adapter_name not in loaded:
            state_dict = load_adapter_weights(weights_path(entry))
            check_fits(state_dict, pipe)
            pipe.load_lora_weights(
                str(entry.path), weight_name=WEIGHTS_NAME, adapter_name=adapter_name
            )
        names.append(adapter_name)
        scales.append(float(scale))
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
    return names


__all__ = [
    "AdapterError",
    "AdapterInfo",
    "StoreError",
    "apply_adapters",
    "check_finite",
    "check_fits",
    "check_made_for",
    "get_adapter",
    "list_adapters",
    "load_adapter_weights",
    "lora_layers",
    "save_adapter",
    "verify_adapter",
    "weights_path",
    "write_lora_file",
]
