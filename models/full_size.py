"""The full-size SDXL 1.0 architecture with random weights: the real model's shapes and FLOPs.

Speed and memory are measured on it, since no machine here can download the real weights. With
`meta=True` nothing is allocated, so parameter counts can be checked in a second.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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

SPECIAL_TOKENS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
"""The byte-level tokenizer's ids (the real CLIP tokenizer uses 49406/49407)."""


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_full_size_pipeline(
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    meta: bool = False,
    seed: int = 0,
) -> StableDiffusionXLPipeline:
    """SDXL 1.0 base, exact published architecture, random weights from `seed`.

    The weights are created directly on `device` in `dtype`: building in float32 on the CPU and
    converting would need 14 GB of host memory and minutes of random initialisation, where on a
    GPU it takes seconds. Random values differ between devices for the same seed, which does not
    matter for timing. `meta=True` builds on the meta device (shapes only, no memory).

    The tokenizers are byte-level (ids below 520), a subset of the real 49,408-token vocabulary
    the text encoders keep, so prompts run through embedding tables of the real shapes. The VAE
    takes `dtype` too: its config has `force_upcast`, so the pipeline decodes in float32 when
    `dtype` is float16, as with the real SDXL VAE.
    """
    torch.manual_seed(seed)
    place = torch.device("meta") if meta else torch.device(device)
    with place, _default_dtype(dtype):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG, **SPECIAL_TOKENS))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**TEXT_ENCODER_2_CONFIG, **SPECIAL_TOKENS)
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=byte_level_tokenizer(),
        tokenizer_2=byte_level_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def parameter_counts(pipe: StableDiffusionXLPipeline) -> dict[str, int]:
    """Parameters per network, to check a build against the published SDXL 1.0 figures."""
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in COMPONENTS}
