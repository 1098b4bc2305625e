"""SDXL bases in the model store: import one from any source, find its folder and hash."""

from __future__ import annotations

import logging
from pathlib import Path

from diffusers import StableDiffusionXLPipeline

from models.device import parse_dtype
from models.loading import load_pipeline, resolve_source
from models.store import StoreEntry, create_entry, get_entry

log = logging.getLogger(__name__)

KIND = "base"


def save_base(
    pipe: StableDiffusionXLPipeline,
    name: str,
    *,
    source: str,
    revision: str | None = None,
    vae_source: str | None = None,
    reuse_identical: bool = False,
) -> StoreEntry:
    """Save a loaded pipeline into the store as base `name`, with source, revision, hash, dtype.

    With `reuse_identical`, an existing version of `name` with the same content hash is returned
    instead of adding a duplicate (so `build-tiny` can run before every quickstart).
    """
    dtype = str(pipe.unet.dtype).removeprefix("torch.")
    with create_entry(name, kind=KIND, reuse_identical=reuse_identical) as staged:
        pipe.save_pretrained(staged.path, safe_serialization=True)
        staged.metadata.update(
            {
                "source": source,
                "revision": revision or "",
                "vae_source": vae_source or "",
                "dtype": dtype,
                "parameters": {
                    component: sum(p.numel() for p in getattr(pipe, component).parameters())
                    for component in ("unet", "vae", "text_encoder", "text_encoder_2")
                },
            }
        )
    entry = get_entry(staged.tag, kind=KIND)
    log.info(
        "imported base %s from %s (hash %s)", entry.tag, source, entry.metadata["content_hash"][:12]
    )
    return entry


def import_base(
    source: str,
    name: str,
    *,
    dtype: str = "float16",
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
) -> StoreEntry:
    """Load a base from a hub id, folder or single file and save it into the store."""
    resolved = resolve_source(source)
    if resolved.kind == "store":
        raise ValueError(f"{source!r} is already a store tag; import from a folder, file or hub id")
    pipe = load_pipeline(
        source,
        dtype=parse_dtype(dtype),
        vae=vae,
        revision=revision,
        variant=variant,
        single_file_config=single_file_config,
    )
    return save_base(pipe, name, source=resolved.describe(), revision=revision, vae_source=vae)


def get_base(tag: str) -> StoreEntry:
    """The store entry of base `tag` (`sdxl-tiny` or `sdxl-tiny:version`)."""
    return get_entry(tag, kind=KIND)


def base_path(tag: str) -> Path:
    """The diffusers folder of base `tag` in the store."""
    return get_base(tag).path
