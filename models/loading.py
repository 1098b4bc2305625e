"""Load an SDXL pipeline from wherever it lives: the model store, a local folder, a single file, the hub.

One function, `load_pipeline`, serves the tiny model, the full-size random model and the real
SDXL, so the code path exercised in tests is the production one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

log = logging.getLogger(__name__)

SourceKind = Literal["store", "folder", "single_file", "hub"]

SINGLE_FILE_SUFFIXES = (".safetensors",)
"""Single checkpoints must be safetensors: pickled `.ckpt` files can run code when loaded."""


class ModelSourceError(ValueError):
    """The model source names nothing that can be loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, as resolved from the string a user typed."""

    kind: SourceKind
    ref: str

    def describe(self) -> str:
        return f"{self.kind}:{self.ref}"


def resolve_source(source: str | Path) -> ModelSource:
    """Tell what `source` names.

    An explicit prefix wins (`store:`, `folder:`, `file:`, `hf:`); otherwise an existing path is a
    folder or single file, `org/name` is a hub id, and anything else is a model-store tag.
    """
    text = str(source).strip()
    if not text:
        raise ModelSourceError(
            "empty model source: give a store tag, a folder, a .safetensors file or a hub id"
        )
    prefixes = {"store:": "store", "folder:": "folder", "file:": "single_file", "hf:": "hub"}
    for prefix, kind in prefixes.items():
        if text.startswith(prefix):
            return ModelSource(kind, text[len(prefix) :])  # type: ignore[arg-type]
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource("folder", str(path))
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelSourceError(
            f"{text}: pickled checkpoints are refused; convert it to .safetensors"
        )
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelSourceError(f"{text}: no such file")
        return ModelSource("single_file", str(path))
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return ModelSource("hub", text)
    if "/" in text:
        raise ModelSourceError(f"{text}: no such folder")
    return ModelSource("store", text)


def load_pipeline(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae: str | Path | None = None,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
) -> StableDiffusionXLPipeline:
    """Load an SDXL pipeline.

    Args:
        source: a model-store tag (`sdxl-tiny`, `sdxl-base:v3`), a local diffusers folder, a single
            `.safetensors` checkpoint (A1111/Civitai form) or a hub id (`org/name`).
        dtype: weight dtype, e.g. `torch.bfloat16` on a GPU.
        device: where the weights go; the caller decides, nothing here assumes CUDA.
        vae: optional VAE to use instead of the pipeline's own (folder, hub id or .safetensors),
            e.g. the fp16-fix VAE.
        revision, variant: passed to the hub loader (`variant="fp16"` picks the half files).
        single_file_config: diffusers config (hub id or folder) for a single-file checkpoint;
            defaults to the SDXL base repository, which needs the hub or its cache.
    """
    resolved = resolve_source(source)
    log.info("loading pipeline from %s (%s)", resolved.describe(), dtype)
    kwargs: dict = {"dtype": dtype}
    if vae is not None:
        kwargs["vae"] = load_vae(vae, dtype=dtype)
    if resolved.kind == "store":
        from models.bases import base_path

        pipe = StableDiffusionXLPipeline.from_pretrained(base_path(resolved.ref), **kwargs)
    elif resolved.kind == "folder":
        if not (Path(resolved.ref) / "model_index.json").is_file():
            raise ModelSourceError(
                f"{resolved.ref}: not a diffusers pipeline folder (no model_index.json)"
            )
        pipe = StableDiffusionXLPipeline.from_pretrained(resolved.ref, **kwargs)
    elif resolved.kind == "single_file":
        if single_file_config is not None:
            kwargs["config"] = single_file_config
        pipe = StableDiffusionXLPipeline.from_single_file(resolved.ref, **kwargs)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            resolved.ref, revision=revision, variant=variant, use_safetensors=True, **kwargs
        )
    return pipe.to(device)


def load_vae(source: str | Path, *, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Load a VAE from a folder, a hub id or a single .safetensors file."""
    text = str(source)
    path = Path(text).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelSourceError(f"VAE {text}: no such file")
        return AutoencoderKL.from_single_file(str(path), dtype=dtype)
    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return AutoencoderKL.from_pretrained(sub, dtype=dtype)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return AutoencoderKL.from_pretrained(text, dtype=dtype)
    raise ModelSourceError(f"VAE {text}: not a folder, a .safetensors file or a hub id")
