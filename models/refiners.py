"""SDXL refiners in the model store: import one (hub id, diffusers folder), build the tiny one
tests use, load one beside a served base.

A refiner is an SDXL image-to-image pipeline with the second text encoder only and a UNet
conditioned on an aesthetic score (`requires_aesthetics_score`); it shares the base's VAE
latent space. It is stored as its own kind (`refiner`), as a diffusers folder.
"""

from __future__ import annotations

import logging

import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from models.device import parse_dtype
from models.store import StoreEntry, create_entry, get_entry

log = logging.getLogger(__name__)

KIND = "refiner"


def save_refiner(
    pipe: StableDiffusionXLImg2ImgPipeline,
    name: str,
    *,
    source: str,
    reuse_identical: bool = False,
) -> StoreEntry:
    """Save a loaded refiner pipeline into the store as `name`."""
    with create_entry(name, kind=KIND, reuse_identical=reuse_identical) as staged:
        pipe.save_pretrained(staged.path, safe_serialization=True)
        staged.metadata.update(
            {
                "source": source,
                "dtype": str(pipe.unet.dtype).removeprefix("torch."),
                "parameters": sum(p.numel() for p in pipe.unet.parameters()),
            }
        )
    entry = get_entry(staged.tag, kind=KIND)
    log.info("stored refiner %s from %s", entry.tag, source)
    return entry


def import_refiner(source: str, name: str, *, dtype: str = "float16") -> StoreEntry:
    """A refiner from a hub id (stabilityai/stable-diffusion-xl-refiner-1.0) or folder."""
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(source, dtype=parse_dtype(dtype))
    return save_refiner(pipe, name, source=source)


def build_tiny_refiner(
    base: StableDiffusionXLPipeline, seed: int = 1
) -> StableDiffusionXLImg2ImgPipeline:
    """A refiner of the tiny base's scale: the base's VAE, second text encoder and tokenizer
    (as SDXL's refiner shares the VAE and OpenCLIP bigG with the base), a new UNet of the
    refiner's kind (conditioned on the second encoder alone and on an aesthetic score) drawn
    from `seed`."""
    from models.sdxl_config import SCHEDULER_CONFIG
    from models.tiny import TEXT_HIDDEN_2, TIME_EMBED_DIM

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=TEXT_HIDDEN_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # original size (2) + crop (2) + aesthetic score (1), then the pooled text embedding
        projection_class_embeddings_input_dim=5 * TIME_EMBED_DIM + TEXT_HIDDEN_2,
        norm_num_groups=32,
    )
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def load_refiner(tag: str, *, dtype: torch.dtype, device: str) -> StableDiffusionXLImg2ImgPipeline:
    """Refiner `tag` from the store, on `device` in `dtype`; ValueError if it is not one."""
    entry = get_entry(tag, kind=KIND)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(entry.path, dtype=dtype)
    if not pipe.config.get("requires_aesthetics_score") or pipe.text_encoder is not None:
        raise ValueError(f"{tag} is not an SDXL refiner (aesthetic score, second encoder only)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
