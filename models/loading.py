"""Load an SDXL pipeline from wherever it lives: the model store, a local folder, a single file, the hub.

One function, `load_pipeline`, serves the tiny model, the full-size random model and the real
SDXL, so the code path exercised in tests is the production one.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

log = logging.getLogger(__name__)

SourceKind = Literal["store", "folder", "single_file", "hub"]

SINGLE_FILE_SUFFIXES = (".safetensors",)
"""Single checkpoints must be safetensors: pickled `.ckpt` files can run code when loaded."""

SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
"""Default config source for single-file checkpoints (needs the hub or its cache)."""


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
        single_file_config: for a single-file checkpoint, where its configs, tokenizers and
            scheduler come from: a diffusers folder or store tag of the same architecture (works
            offline) or a hub id; defaults to the SDXL base repository (the hub or its cache).
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
        config = _single_file_config(single_file_config)
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(resolved.ref, config=config, **kwargs)
        except OSError as error:  # huggingface_hub's offline and not-found errors are OSErrors
            raise ModelSourceError(
                f"{resolved.ref}: the diffusers config {config!r} for this single file could not "
                f"be read ({error}); pass single_file_config= a local diffusers folder or store "
                "tag of the same architecture"
            ) from error
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            resolved.ref, revision=revision, variant=variant, use_safetensors=True, **kwargs
        )
    return pipe.to(device)


def _single_file_config(config: str | Path | None) -> str:
    """The diffusers folder or hub id that supplies configs, tokenizers and scheduler.

    A single checkpoint holds weights only. Without a config, diffusers guesses the model family
    from the keys and, for one it does not recognise (such as the tiny model), falls back to
    Stable Diffusion 1.5 configs; naming SDXL explicitly avoids that.
    """
    if config is None:
        return SDXL_BASE_REPO
    resolved = resolve_source(config)
    if resolved.kind == "store":
        from models.bases import base_path

        return str(base_path(resolved.ref))
    if resolved.kind == "single_file":
        raise ModelSourceError(
            f"single-file config {config}: give a diffusers folder, store tag or hub id"
        )
    if resolved.kind == "folder" and not (Path(resolved.ref) / "model_index.json").is_file():
        raise ModelSourceError(
            f"single-file config {config}: not a diffusers pipeline folder (no model_index.json)"
        )
    return resolved.ref


def load_vae(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    config: str | Path | None = None,
) -> AutoencoderKL:
    """Load a VAE from a folder, a hub id or a single .safetensors file.

    Args:
        source: a VAE folder, a pipeline folder (its `vae/` is used), a hub id, or one
            `.safetensors` file in SGM layout (as A1111 and the fp16-fix VAE ship it) or in
            diffusers layout.
        dtype: weight dtype.
        config: for a single file only: a VAE or pipeline folder, or a VAE hub repo, whose config
            describes the file. A single file carries no config, and the scaling factor cannot be
            read from the weights (SD 1.5 and SDXL VAEs have the same shapes but scale latents by
            0.18215 and 0.13025), so the default is the published SDXL 1.0 VAE config, written
            locally rather than fetched (diffusers alone would guess SD 1.5 from the hub).
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelSourceError(f"VAE {text}: pickled checkpoints are refused; use .safetensors")
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelSourceError(f"VAE {text}: no such file")
        if config is None:
            return _sdxl_vae_from_single_file(path, dtype)
        folder, subfolder = _vae_config_location(config)
        return AutoencoderKL.from_single_file(
            str(path), config=folder, subfolder=subfolder, dtype=dtype
        )
    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return AutoencoderKL.from_pretrained(sub, dtype=dtype)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return AutoencoderKL.from_pretrained(text, dtype=dtype)
    raise ModelSourceError(f"VAE {text}: not a folder, a .safetensors file or a hub id")


def _vae_config_location(config: str | Path) -> tuple[str, str | None]:
    """(folder or hub id, subfolder) of the config describing a single-file VAE."""
    path = Path(config).expanduser()
    if path.is_dir():
        if (path / "vae" / "config.json").is_file():
            return str(path), "vae"
        if (path / "config.json").is_file():
            return str(path), None
        raise ModelSourceError(f"VAE config {config}: no config.json in it or in its vae/")
    return str(config), None


def _sdxl_vae_from_single_file(path: Path, dtype: torch.dtype) -> AutoencoderKL:
    from models.sdxl_config import VAE_CONFIG

    with tempfile.TemporaryDirectory(prefix="sdxl-vae-config-") as folder:
        with torch.device("meta"):  # only the config file is wanted: allocate no weights
            AutoencoderKL(**VAE_CONFIG).save_config(folder)
        try:
            return AutoencoderKL.from_single_file(str(path), config=folder, dtype=dtype)
        except ValueError as error:  # diffusers reports mismatched shapes as a ValueError
            raise ModelSourceError(
                f"VAE {path}: not the SDXL 1.0 VAE architecture ({str(error)[:200]}); pass config= "
                "the VAE or pipeline folder it belongs to"
            ) from error
