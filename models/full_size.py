"""The full-size SDXL 1.0 architecture with random weights: the real model's shapes and FLOPs.

Speed and memory are measured on it, since no machine here can download the real weights. With
`meta=True` nothing is allocated, so parameter counts can be checked in a second.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.sdxl_config import (
    SCHEDULER_CONFIG,
    TEXT_ENCODER_2_CONFIG,
    TEXT_ENCODER_CONFIG,
    UNET_CONFIG,
    VAE_CONFIG,
)
from models.tiny import byte_level_tokenizer

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def build_full_size_pipeline(
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    meta: bool = False,
    seed: int = 0,
) -> StableDiffusionXLPipeline:
    """SDXL 1.0 base, exact published architecture, random weights from `seed`.

    The tokenizers are byte-level (ids below 520), a subset of the real 49,408-token vocabulary
    the text encoders keep, so prompts run through the real embedding tables' shapes.
    """
    torch.manual_seed(seed)
    place = torch.device("meta") if meta else contextlib.nullcontext()
    with place:
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**TEXT_ENCODER_CONFIG, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**TEXT_ENCODER_2_CONFIG, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=byte_level_tokenizer(),
        tokenizer_2=byte_level_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )
    if meta:
        return pipe
    for name in COMPONENTS:
        # The VAE stays float32 unless asked otherwise: the original SDXL VAE overflows in fp16.
        getattr(pipe, name).to(device=device, dtype=dtype)
    return pipe


def parameter_counts(pipe: StableDiffusionXLPipeline) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in COMPONENTS}
